"""Saving and loading weights: the project's own checkpoints and Hugging Face GPT-2 checkpoints.

:func:`load_model` is the one entry for "the model a job starts from": a preset (fresh weights), one of
our checkpoint directories or a Hugging Face GPT-2 directory.

Our checkpoint is a directory with ``config.json`` (the :class:`GPTConfig`) and ``model.safetensors``.
A Hugging Face GPT-2 directory has ``config.json`` plus ``model.safetensors`` or ``pytorch_model.bin``;
its ``Conv1D`` layers store weights as (in, out), so they are transposed into our ``nn.Linear`` (out, in).
``pytorch_model.bin`` is read with ``torch.load(weights_only=True)``: a checkpoint can never run code.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import PRESETS, GPTConfig
from .model import GPT
from .rundir import atomic_write

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
ADAPTERS_FILE = "adapters.safetensors"  # a LoRA finetuning run's weights: its adapters only (gpt.finetune)


class CheckpointError(ValueError):
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
    model = GPT(GPTConfig.from_dict(meta["config"]), kernel_backend=kernel_backend)
    state = load_safetensors(w_path)
    load_state_into(model, state, str(w_path))
    return model.to(map_location)


# ------------------------------------------------------------------------------------- Hugging Face GPT-2


def _looks_like_hf(directory: Path) -> bool:
    return (directory / "pytorch_model.bin").exists() or (
        (directory / WEIGHTS_FILE).exists() and "n_embd" in _read_json(directory / CONFIG_FILE))


def hf_config_to_ours(hf: dict) -> GPTConfig:
    """Map a Hugging Face ``GPT2Config`` dict to :class:`GPTConfig`."""
    try:
        return GPTConfig(
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


def hf_state_to_ours(hf_state: dict[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """Rename GPT-2's tensors to ours, transposing its Conv1D (in, out) weights to Linear (out, in)."""
    sd = {k.removeprefix("transformer."): v for k, v in hf_state.items()}

    def take(name):
        if name not in sd:
            raise CheckpointError(f"the GPT-2 checkpoint has no tensor {name!r}: it is incomplete or not GPT-2")
        return sd[name]

    out = {"tok_emb.weight": take("wte.weight"), "pos_emb.weight": take("wpe.weight"),
           "final_norm.weight": take("ln_f.weight"), "final_norm.bias": take("ln_f.bias")}
    for i in range(cfg.n_layers):
        p, q = f"h.{i}.", f"blocks.{i}."
        out[q + "ln1.weight"], out[q + "ln1.bias"] = take(p + "ln_1.weight"), take(p + "ln_1.bias")
        out[q + "ln2.weight"], out[q + "ln2.bias"] = take(p + "ln_2.weight"), take(p + "ln_2.bias")
        out[q + "attn.qkv.weight"] = take(p + "attn.c_attn.weight").t()  # (C, 3C) -> (3C, C)
        out[q + "attn.qkv.bias"] = take(p + "attn.c_attn.bias")
        out[q + "attn.proj.weight"] = take(p + "attn.c_proj.weight").t()
        out[q + "attn.proj.bias"] = take(p + "attn.c_proj.bias")
        out[q + "mlp.fc.weight"] = take(p + "mlp.c_fc.weight").t()  # (C, 4C) -> (4C, C)
        out[q + "mlp.fc.bias"] = take(p + "mlp.c_fc.bias")
        out[q + "mlp.proj.weight"] = take(p + "mlp.c_proj.weight").t()
        out[q + "mlp.proj.bias"] = take(p + "mlp.c_proj.bias")
    if not cfg.tie_weights:
        out["head.weight"] = hf_state.get("lm_head.weight", sd["wte.weight"])
    return {k: v.contiguous() for k, v in out.items()}


def load_hf(directory, map_location="cpu", kernel_backend: str | None = None, **overrides) -> GPT:
    """Load a Hugging Face GPT-2 checkpoint directory (e.g. ``gpt2`` downloaded with ``save_pretrained``).

    ``overrides`` change config fields that do not affect the weights (``dropout``, ``pad_vocab_multiple``).
    """
    directory = _require_dir(directory)
    cfg_path = directory / CONFIG_FILE
    if not cfg_path.exists():
        raise CheckpointError(f"{directory} holds no {CONFIG_FILE}: not a Hugging Face GPT-2 checkpoint "
                              f"(it needs config.json plus model.safetensors or pytorch_model.bin)")
    hf_cfg = _read_json(cfg_path)
    if hf_cfg.get("model_type", "gpt2") != "gpt2":
        raise CheckpointError(f"{cfg_path} describes a {hf_cfg.get('model_type')!r} model, not GPT-2")
    cfg = hf_config_to_ours(hf_cfg)
    if overrides:
        cfg = GPTConfig.from_dict({**cfg.to_dict(), **overrides})
    st, binf = directory / WEIGHTS_FILE, directory / "pytorch_model.bin"
    if st.exists():
        hf_state = load_safetensors(st)
    elif binf.exists():
        try:
            hf_state = torch.load(binf, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle errors, truncation, or code the safe loader refuses to run
            raise CheckpointError(f"could not read {binf} safely ({type(e).__name__}: {e})") from None
    else:
        raise CheckpointError(f"{directory} has {CONFIG_FILE} but no model.safetensors or pytorch_model.bin")
    model = GPT(cfg, kernel_backend=kernel_backend)
    ours = hf_state_to_ours(hf_state, cfg)
    if cfg.padded_vocab_size != cfg.vocab_size:  # pad the embedding rows; the padding never reaches a logit
        pad = cfg.padded_vocab_size - cfg.vocab_size
        for k in ("tok_emb.weight", "head.weight"):
            if k in ours:
                ours[k] = torch.cat([ours[k], ours[k].new_zeros(pad, ours[k].shape[1])])
    load_state_into(model, ours, str(directory))
    return model.to(map_location)


# ------------------------------------------------------------------------------------- any of the three

SOURCE_KINDS = ("checkpoint", "hf", "preset")


def model_source(checkpoint=None, hf=None, preset=None, default_preset: str = "mini") -> tuple[str, str]:
    """(kind, source) of the options --checkpoint, --hf and --preset: the first given, else the preset."""
    if checkpoint and hf:
        raise ValueError("give either a checkpoint or a Hugging Face directory to start from, not both")
    if checkpoint:
        return "checkpoint", str(checkpoint)
    if hf:
        return "hf", str(hf)
    return "preset", preset or default_preset


def describe_source(kind: str, source: str) -> str:
    return {"checkpoint": f"checkpoint {source}", "hf": f"GPT-2 weights from {source}",
            "preset": f"UNTRAINED {source} (random weights)"}[kind]


def load_model(source, device="cpu", *, kind: str | None = None, kernel_backend: str | None = None,
               **overrides) -> GPT:
    """A GPT from ``source``: a preset name (``"tiny"``, ``"gpt2-small"``: freshly initialised), one of our
    checkpoint directories, or a Hugging Face GPT-2 directory; ``kind`` (one of ``SOURCE_KINDS``) says
    which, None tells it from the source. ``overrides`` change config fields: any for a preset; for loaded
    weights only those that leave the tensors' shapes alone (``dropout``; ``pad_vocab_multiple`` for HF)."""
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
        raise ValueError(f"unknown model source kind {kind!r}: choose one of {', '.join(SOURCE_KINDS)}")
    model = load_checkpoint(source, map_location=device, kernel_backend=kernel_backend)
    unknown = set(overrides) - {"dropout"}
    if unknown:
        raise ValueError(f"a checkpoint's {sorted(unknown)} cannot be changed when loading it")
    if overrides.get("dropout") is not None:
        model.set_dropout(overrides["dropout"])
    return model
