"""Saving and loading weights: the project's own checkpoints and Hugging Face GPT-2 checkpoints.

:func:`load_model` is the one entry for "the model a job starts from": a preset (fresh weights), one of
our checkpoint directories or a Hugging Face GPT-2 directory.

Our checkpoint is a directory with ``config.json`` (the :class:`GPTConfig`) and ``model.safetensors``.
A Hugging Face GPT-2 directory has ``config.json`` plus ``model.safetensors`` or ``pytorch_model.bin``;
its ``Conv1D`` layers store weights as (in, out), so they are transposed into our ``nn.Linear`` (out, in).
``pytorch_model.bin`` is read with ``torch.load(weights_only=True)``: a checkpoint can never run code.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import PRESETS, GPTConfig
from .errors import UserError
from .model import GPT, GPTClassifier
from .rundir import atomic_write

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
ADAPTERS_FILE = "adapters.safetensors"  # a LoRA finetuning run's weights: its adapters only (gpt.finetune)


class CheckpointError(UserError):
    """A checkpoint directory that is missing, incomplete, corrupt or for another model."""


def _require_dir(path) -> Path:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint directory {str(path)!r} does not exist: check the path")
    if not path.is_dir():
        raise CheckpointError(f"{str(path)!r} is a file, not a checkpoint directory: give the directory that "
                              f"holds {CONFIG_FILE} and the weights")
    return path


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}): the checkpoint is corrupt") from None


def load_safetensors(path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, with a clear error for a truncated or foreign file."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"could not read {path}: {e}. The file is truncated or not a safetensors "
                              f"file: save the checkpoint again") from None


def model_state_for_saving(model: GPT) -> dict[str, torch.Tensor]:
    """The model's tensors, contiguous, without the head weight when it is tied to the embedding."""
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_weights:
        state.pop("head.weight", None)
    return state


def save_checkpoint(model: GPT, directory, extra_config: dict | None = None) -> Path:
    """Save ``model`` to ``directory`` (created if needed): ``config.json`` + ``model.safetensors``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = model_state_for_saving(model)
    meta = {"format": "gpt-triton", "config": model.config.to_dict(), **(extra_config or {})}
    atomic_write(directory / WEIGHTS_FILE, lambda p: save_file(state, str(p), metadata={"format": "pt"}))
    atomic_write(directory / CONFIG_FILE, lambda p: p.write_text(json.dumps(meta, indent=2)))
    return directory


def blank_gpt(cfg: GPTConfig, kernel_backend: str | None = None) -> GPT:
    """A GPT of ``cfg`` whose weights are about to be loaded: built on the meta device, so no time goes into
    a random initialisation and the random generators are left as they were (what a run draws next, LoRA's
    adapters say, does not depend on the model loaded), then given uninitialised CPU memory. Tied weights
    stay tied. Fill every tensor (:func:`load_state_into` refuses a state that misses one)."""
    with torch.device("meta"):
        model = GPT(cfg, kernel_backend=kernel_backend)
    model = model.to_empty(device="cpu")
    if cfg.tie_weights:
        model.head.weight = model.tok_emb.weight  # (to_empty made each its own tensor)
    return model


def load_state_into(model: GPT, state: dict[str, torch.Tensor], source: str) -> GPT:
    """Copy ``state`` into ``model`` with errors that name the offending tensor."""
    expected = model.state_dict()
    if model.config.tie_weights:
        expected.pop("head.weight", None)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{source} does not match the model: missing {missing[:5]}"
                              f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                              f"{'...' if len(unexpected) > 5 else ''}")
    for k, v in state.items():
        if v.shape != expected[k].shape:
            raise CheckpointError(f"{source}: tensor {k!r} has shape {tuple(v.shape)} but the model expects "
                                  f"{tuple(expected[k].shape)}: the checkpoint is for another configuration")
    broken = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if broken:
        raise CheckpointError(f"{source}: {len(broken)} tensor(s) hold nan or inf values ({', '.join(broken[:3])}"
                              f"{', ...' if len(broken) > 3 else ''}): the run that saved them had diverged. Use "
                              f"another checkpoint, or train again with a lower --lr")
    model.load_state_dict(state, strict=False)
    return model


def load_checkpoint(directory, map_location="cpu", kernel_backend: str | None = None) -> GPT:
    """Load a model saved by :func:`save_checkpoint` (or by ``gpt train``)."""
    directory = _require_dir(directory)
    cfg_path, w_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    if (directory / ADAPTERS_FILE).exists() and not w_path.exists():
        raise CheckpointError(f"{directory} holds LoRA adapters, not a whole model: merge them into their base "
                              f"model with `gpt lora-merge --checkpoint {directory} --out NEW_DIR` and use NEW_DIR")
    if not cfg_path.exists() or not w_path.exists():
        hint = " It looks like a Hugging Face GPT-2 directory: use load_hf / --hf." if (
            cfg_path.exists() and _looks_like_hf(directory)) else ""
        raise CheckpointError(f"{directory} is not a checkpoint of this project: it needs {CONFIG_FILE} and "
                              f"{WEIGHTS_FILE}.{hint}")
    meta = _read_json(cfg_path)
    if "config" not in meta:
        raise CheckpointError(f"{cfg_path} has no 'config' entry: not a checkpoint of this project"
                              + (" (it looks like a Hugging Face config: use load_hf / --hf)"
                                 if "n_embd" in meta else ""))
    model = blank_gpt(GPTConfig.from_dict(meta["config"]), kernel_backend=kernel_backend)
    state = load_safetensors(w_path)
    load_state_into(model, state, str(w_path))
    return model.to(map_location)


# ------------------------------------------------------------------------------------- Hugging Face GPT-2


def _looks_like_hf(directory: Path) -> bool:
    return (directory / "pytorch_model.bin").exists() or (
        (directory / WEIGHTS_FILE).exists() and "n_embd" in _read_json(directory / CONFIG_FILE))


# HF GPT-2's names for our tensors, used both ways (load_hf reads with it, gpt.hf_export writes with it):
# (our name, HF's name, transposed). HF's Conv1D layers store (in, out) weights, our nn.Linear (out, in).
HF_MODEL_NAMES = (("tok_emb.weight", "wte.weight", False), ("pos_emb.weight", "wpe.weight", False),
                  ("final_norm.weight", "ln_f.weight", False), ("final_norm.bias", "ln_f.bias", False))
HF_BLOCK_NAMES = (  # inside block i: ours under "blocks.{i}.", HF's under "h.{i}."
    ("ln1.weight", "ln_1.weight", False), ("ln1.bias", "ln_1.bias", False),
    ("ln2.weight", "ln_2.weight", False), ("ln2.bias", "ln_2.bias", False),
    ("attn.qkv.weight", "attn.c_attn.weight", True), ("attn.qkv.bias", "attn.c_attn.bias", False),  # (3C, C)
    ("attn.proj.weight", "attn.c_proj.weight", True), ("attn.proj.bias", "attn.c_proj.bias", False),
    ("mlp.fc.weight", "mlp.c_fc.weight", True), ("mlp.fc.bias", "mlp.c_fc.bias", False),  # (4C, C)
    ("mlp.proj.weight", "mlp.c_proj.weight", True), ("mlp.proj.bias", "mlp.c_proj.bias", False))
QKV_BIAS = "attn.qkv.bias"  # HF's GPT-2 always has it; a model of ours without it exports zeros there
# HF GPT-2 settings our model has one value of (what HF's default is), and the names of the tanh GELU
HF_FIXED_SETTINGS = {"scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
                     "add_cross_attention": False}
HF_GELU_TANH = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
EXPORT_KEY = "gpt_triton"  # config.json entry where gpt.hf_export records our config (HF keeps unknown entries)


def hf_name_table(cfg: GPTConfig) -> list[tuple[str, str, bool]]:
    """Every (our name, HF GPT-2 name without the ``transformer.`` prefix, transposed) of a model of ``cfg``:
    the token/position embeddings, the final norm, each block's tensors. The head is not in it: tied, it is
    ``wte``; untied, HF's ``lm_head.weight`` (outside ``transformer.``)."""
    table = list(HF_MODEL_NAMES)
    for i in range(cfg.n_layers):
        table += [(f"blocks.{i}.{ours}", f"h.{i}.{hf}", t) for ours, hf, t in HF_BLOCK_NAMES
                  if ours != QKV_BIAS or cfg.qkv_bias]
    return table


def hf_config_to_ours(hf: dict) -> GPTConfig:
    """Map a Hugging Face ``GPT2Config`` dict to :class:`GPTConfig`.

    A directory :func:`gpt.hf_export.export_hf` wrote also records our own config; the settings HF's has no
    place for (``pad_vocab_multiple``, ``init``, ``qkv_bias``) come back from it when the shapes still agree.
    """
    unsupported = {k: hf.get(k, ok) for k, ok in HF_FIXED_SETTINGS.items() if hf.get(k, ok) not in (ok, None)}
    if hf.get("activation_function", "gelu_new") not in HF_GELU_TANH:
        unsupported["activation_function"] = hf["activation_function"]
    if hf.get("n_inner") not in (None, 4 * hf.get("n_embd", 0)):
        unsupported["n_inner"] = hf["n_inner"]
    if unsupported:
        raise CheckpointError(f"this GPT-2 config sets {unsupported}, which this project's GPT does not have: "
                              f"it cannot load the model without changing what it computes")
    try:
        cfg = GPTConfig(
            vocab_size=hf["vocab_size"],
            context_length=hf.get("n_positions", hf.get("n_ctx", 1024)),
            emb_dim=hf["n_embd"],
            n_heads=hf["n_head"],
            n_layers=hf["n_layer"],
            dropout=float(hf.get("resid_pdrop", 0.1)),
            qkv_bias=True,
            tie_weights=bool(hf.get("tie_word_embeddings", True)),
            layer_norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        )
    except KeyError as e:
        raise CheckpointError(f"the Hugging Face config lacks {e.args[0]!r}: not a GPT-2 config.json") from None
    ours = (hf.get(EXPORT_KEY) or {}).get("config")
    if isinstance(ours, dict):
        kept = {k: ours[k] for k in ("pad_vocab_multiple", "init", "qkv_bias") if k in ours}
        same = {k: v for k, v in cfg.to_dict().items() if k not in kept and k != "dropout"}
        if all(ours.get(k) == v for k, v in same.items()):
            cfg = GPTConfig.from_dict({**cfg.to_dict(), **kept})
    return cfg


def hf_state_to_ours(hf_state: dict[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """Rename GPT-2's tensors to ours (:func:`hf_name_table`), transposing its Conv1D (in, out) weights to
    Linear (out, in). With ``cfg.qkv_bias`` False the q/k/v biases must be zero (they are dropped)."""
    sd = {k.removeprefix("transformer."): v for k, v in hf_state.items()}

    def take(name):
        if name not in sd:
            raise CheckpointError(f"the GPT-2 checkpoint has no tensor {name!r}: it is incomplete or not GPT-2")
        return sd[name]

    out = {ours: take(hf).t() if transposed else take(hf) for ours, hf, transposed in hf_name_table(cfg)}
    if not cfg.qkv_bias:
        for i in range(cfg.n_layers):
            if take(f"h.{i}.attn.c_attn.bias").count_nonzero():
                raise CheckpointError(f"h.{i}.attn.c_attn.bias is not zero, but the recorded config has no q/k/v "
                                      f"bias: the checkpoint was changed after export")
    if not cfg.tie_weights:
        out["head.weight"] = hf_state.get("lm_head.weight", sd["wte.weight"])
    return {k: v.contiguous() for k, v in out.items()}


def _read_hf(directory) -> tuple[Path, dict, dict[str, torch.Tensor]]:
    """(directory, config.json, tensors) of a Hugging Face GPT-2 directory, with clear errors."""
    directory = _require_dir(directory)
    cfg_path = directory / CONFIG_FILE
    if not cfg_path.exists():
        raise CheckpointError(f"{directory} holds no {CONFIG_FILE}: not a Hugging Face GPT-2 checkpoint "
                              f"(it needs config.json plus model.safetensors or pytorch_model.bin)")
    hf_cfg = _read_json(cfg_path)
    if hf_cfg.get("model_type", "gpt2") != "gpt2":
        raise CheckpointError(f"{cfg_path} describes a {hf_cfg.get('model_type')!r} model, not GPT-2")
    st, binf = directory / WEIGHTS_FILE, directory / "pytorch_model.bin"
    if st.exists():
        return directory, hf_cfg, load_safetensors(st)
    if not binf.exists():
        raise CheckpointError(f"{directory} has {CONFIG_FILE} but no model.safetensors or pytorch_model.bin")
    try:
        return directory, hf_cfg, torch.load(binf, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, truncation, or code the safe loader refuses to run
        raise CheckpointError(f"could not read {binf} safely ({type(e).__name__}: {e})") from None


def _hf_gpt(directory: Path, hf_cfg: dict, hf_state: dict, kernel_backend, overrides: dict) -> GPT:
    cfg = hf_config_to_ours(hf_cfg)
    if overrides:
        cfg = GPTConfig.from_dict({**cfg.to_dict(), **overrides})
    sd = {k.removeprefix("transformer."): v for k, v in hf_state.items()}
    if not cfg.qkv_bias and any(sd[f"h.{i}.attn.c_attn.bias"].count_nonzero() for i in range(cfg.n_layers)
                                if f"h.{i}.attn.c_attn.bias" in sd):
        cfg = dataclasses.replace(cfg, qkv_bias=True)  # exported without q/k/v biases, trained with them since
    model = blank_gpt(cfg, kernel_backend=kernel_backend)
    ours = hf_state_to_ours(hf_state, cfg)
    if cfg.padded_vocab_size != cfg.vocab_size:  # pad the embedding rows; the padding never reaches a logit
        pad = cfg.padded_vocab_size - cfg.vocab_size
        for k in ("tok_emb.weight", "head.weight"):
            if k in ours:
                ours[k] = torch.cat([ours[k], ours[k].new_zeros(pad, ours[k].shape[1])])
    return load_state_into(model, ours, str(directory))


def load_hf(directory, map_location="cpu", kernel_backend: str | None = None, **overrides) -> GPT:
    """Load a Hugging Face GPT-2 checkpoint directory (e.g. ``gpt2`` downloaded with ``save_pretrained``).

    ``overrides`` change config fields that do not affect the weights (``dropout``, ``pad_vocab_multiple``).
    A ``GPT2ForSequenceClassification`` directory gives its transformer; :func:`load_hf_classifier` gives
    the classifier.
    """
    directory, hf_cfg, hf_state = _read_hf(directory)
    return _hf_gpt(directory, hf_cfg, hf_state, kernel_backend, overrides).to(map_location)


def load_hf_classifier(directory, map_location="cpu", kernel_backend: str | None = None,
                       **overrides) -> tuple[GPTClassifier, list[str]]:
    """A Hugging Face ``GPT2ForSequenceClassification`` directory (as :func:`gpt.hf_export.export_hf` writes
    one) as a :class:`GPTClassifier` and its labels by class index. HF's score layer has no bias: the head's
    bias is zero (an exported classifier's bias lives in the final LayerNorm's, which computes the same)."""
    directory, hf_cfg, hf_state = _read_hf(directory)
    score = hf_state.get("score.weight")
    if score is None:
        raise CheckpointError(f"{directory} holds no score.weight: not a GPT2ForSequenceClassification checkpoint")
    gpt = _hf_gpt(directory, hf_cfg, hf_state, kernel_backend, overrides)
    model = GPTClassifier(gpt, score.shape[0])
    with torch.no_grad():
        model.head.weight.copy_(score)
        model.head.bias.zero_()
    id2label = hf_cfg.get("id2label") or {}
    labels = [str(id2label.get(str(i), f"LABEL_{i}")) for i in range(score.shape[0])]
    return model.to(map_location), labels


# ------------------------------------------------------------------------------------- any of the three

SOURCE_KINDS = ("checkpoint", "hf", "preset")


def model_source(checkpoint=None, hf=None, preset=None, default_preset: str = "mini") -> tuple[str, str]:
    """(kind, source) of the options --checkpoint, --hf and --preset: the first given, else the preset."""
    if checkpoint and hf:
        raise UserError("give either a checkpoint or a Hugging Face directory to start from, not both")
    if checkpoint:
        return "checkpoint", str(checkpoint)
    if hf:
        return "hf", str(hf)
    return "preset", preset or default_preset


GPU_PAD_MULTIPLE = 64  # vocabulary rows on a GPU: 50,257 -> 50,304 (16-byte rows for the head and the loss)


def vocab_padding(kind: str, given: int | None, device) -> dict:
    """The :func:`load_model` override for a model that trains its output head: a fresh or GPT-2 model's
    vocabulary rows rounded up to ``given``, else to 64 on CUDA and not at all on the CPU; nothing for one
    of our checkpoints, which keeps its own (see :func:`check_vocab_padding`)."""
    if kind == "checkpoint":
        return {}
    return {"pad_vocab_multiple": given or (GPU_PAD_MULTIPLE if torch.device(device).type == "cuda" else 1)}


def check_vocab_padding(model: GPT, given: int | None, source: str) -> None:
    """Refuse a ``--pad-vocab-multiple`` that the loaded model (a checkpoint's padding) contradicts."""
    pad = model.config.pad_vocab_multiple
    if given not in (None, pad):
        raise UserError(f"--pad-vocab-multiple {given}: the model in {source} has its rows padded to a multiple "
                        f"of {pad}, which a checkpoint keeps; leave the option out")


def describe_source(kind: str, source: str) -> str:
    return {"checkpoint": f"checkpoint {source}", "hf": f"GPT-2 weights from {source}",
            "preset": f"UNTRAINED {source} (random weights)"}[kind]


def load_model(source, device="cpu", *, kind: str | None = None, kernel_backend: str | None = None,
               **overrides) -> GPT:
    """A GPT from ``source``: a preset name (``"tiny"``, ``"gpt2-small"``: freshly initialised), one of our
    checkpoint directories, or a Hugging Face GPT-2 directory; ``kind`` (one of ``SOURCE_KINDS``) says
    which, None tells it from the source. ``overrides`` change config fields: any for a preset; for GPT-2
    weights only those that leave the tensors' shapes alone (``dropout``, ``pad_vocab_multiple``); none for
    our checkpoints (they keep their own config)."""
    if kind is None:
        path = Path(source)
        kind = ("preset" if str(source) in PRESETS and not path.exists()
                else "hf" if path.is_dir() and (path / CONFIG_FILE).exists() and _looks_like_hf(path)
                else "checkpoint")
    if kind == "preset":
        return GPT.from_preset(str(source), kernel_backend=kernel_backend, **overrides).to(device)
    if kind == "hf":
        return load_hf(source, map_location=device, kernel_backend=kernel_backend, **overrides)
    if kind != "checkpoint":
        raise UserError(f"unknown model source kind {kind!r}: choose one of {', '.join(SOURCE_KINDS)}")
    if overrides:
        raise UserError(f"a checkpoint's {sorted(overrides)} cannot be changed when loading it (its dropout: "
                        f"model.set_dropout(p) on the loaded model)")
    return load_checkpoint(source, map_location=device, kernel_backend=kernel_backend)
