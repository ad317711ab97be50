"""Export a model as a Hugging Face GPT-2 directory, which transformers loads offline.

    from gpt import export_hf
    export_hf(model, "hf/")                      # a GPT (LoRA adapters are merged, on a copy)
    export_hf(classifier, "hf-spam/", labels=["ham", "spam"])       # a GPTClassifier

    from transformers import AutoTokenizer, GPT2LMHeadModel
    hf = GPT2LMHeadModel.from_pretrained("hf/")  # or GPT2ForSequenceClassification for a classifier
    tok = AutoTokenizer.from_pretrained("hf/")

The directory holds what ``save_pretrained`` would write: ``config.json`` (a ``GPT2Config``, plus our own config
under ``gpt_triton``, which transformers keeps and :func:`gpt.load_hf` reads back), ``model.safetensors`` (HF's
tensor names, from the one name table in :mod:`gpt.weights`, Conv1D's (in, out) layout, the head's padding rows
cut off, a tied head stored once and tied again on loading), ``generation_config.json`` for a language model,
and GPT-2's tokenizer: ``vocab.json`` and ``merges.txt`` are our bundled ``encoder.json`` and ``vocab.bpe`` under
the names transformers reads, with ``tokenizer_config.json``.

What HF's GPT-2 cannot hold is refused in one line, never dropped: a module the name table does not know (a
custom layer), or a classifier output bias that cannot be moved. ``GPT2ForSequenceClassification`` scores
``ln_f(h) @ score^T`` with no bias; ours adds one, ``c``. Since nothing else reads ``ln_f``'s output in that
model, the bias moves into it exactly: ``ln_f.bias += pinv(W) c``, so that ``W (x + b') = W (x + b) + c``
(solved in float64, and refused when the head's weight is too ill-conditioned to do it within 1e-6).

``gpt export RUN --to DIR`` (:func:`export_run`) does this for a run directory: a pretraining run, a full or a
LoRA finetuning run (merged), a classifier with its labels.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

from .errors import UserError
from .lora import has_lora, merge_lora
from .model import GPT, GPTClassifier
from .rundir import atomic_write, need
from .tokenizer import EOT_ID, EOT_TOKEN, VOCAB_SIZE, asset_path
from .trainer_state import holds_run
from .weights import CONFIG_FILE, EXPORT_KEY, WEIGHTS_FILE, hf_name_table

TOKENIZER_FILES = {"vocab.json": "encoder.json", "merges.txt": "vocab.bpe"}  # HF's name: our bundled file
WRITTEN = (CONFIG_FILE, WEIGHTS_FILE, "generation_config.json", "tokenizer_config.json", *TOKENIZER_FILES)
# files of another save that transformers would read before ours (a tokenizer.json wins over vocab + merges)
SHADOWING = ("tokenizer.json", "pytorch_model.bin", "pytorch_model.bin.index.json", "model.safetensors.index.json",
             "special_tokens_map.json", "added_tokens.json")
FOLD_TOLERANCE = 1e-6  # largest change of a class score (x (1 + |bias|)) when the output bias moves into ln_f;
# 8 rounding units of a 16-bit model's dtype


def export_hf(model: nn.Module, directory, *, labels: list[str] | None = None, force: bool = False,
              tokenizer: bool = True) -> Path:
    """Write ``model`` (a :class:`GPT` or a :class:`GPTClassifier`) to ``directory`` as a Hugging Face GPT-2.

    ``labels``: a classifier's class names, by index (default ``LABEL_0``...). ``force``: write into a
    directory that holds other files (ours are replaced, and files that would shadow them are removed).
    ``tokenizer``: add GPT-2's tokenizer files (refused for a vocabulary other than GPT-2's 50,257 tokens).
    """
    gpt, head = (model.gpt, model.head) if isinstance(model, GPTClassifier) else (model, None)
    if not isinstance(gpt, GPT):
        raise TypeError(f"export_hf exports a gpt.GPT or gpt.GPTClassifier, got {type(model).__name__}")
    if labels is not None and head is None:
        raise UserError("labels are a classifier's: this model is a language model (a GPT), not a GPTClassifier")
    if has_lora(gpt):
        gpt = merge_lora(copy.deepcopy(gpt))  # the caller's model keeps its adapters
    cfg = gpt.config
    if tokenizer and cfg.vocab_size != VOCAB_SIZE:
        raise UserError(f"the model's vocabulary has {cfg.vocab_size:,} tokens, GPT-2's tokenizer {VOCAB_SIZE:,}: "
                        f"export it with tokenizer=False and add a tokenizer of its own")
    labels = _labels(head, labels)
    state = hf_state(gpt, head)
    directory = _prepare_dir(directory, force)
    meta = hf_config(gpt, labels, state["transformer.wte.weight"].dtype)
    atomic_write(directory / WEIGHTS_FILE, lambda p: save_file(state, str(p), metadata={"format": "pt"}))
    _write_json(directory / CONFIG_FILE, meta)
    if head is None:
        _write_json(directory / "generation_config.json",
                    {"bos_token_id": EOT_ID, "eos_token_id": EOT_ID, "pad_token_id": EOT_ID})
    if tokenizer:
        for name, ours in TOKENIZER_FILES.items():
            atomic_write(directory / name, lambda p, src=ours: shutil.copyfile(asset_path(src), p))
        _write_json(directory / "tokenizer_config.json", tokenizer_config(cfg.context_length, head is not None))
    return directory


def hf_state(gpt: GPT, head: nn.Linear | None = None) -> dict[str, torch.Tensor]:
    """The tensors of HF's ``GPT2LMHeadModel`` (``head`` None) or ``GPT2ForSequenceClassification``, by HF's
    names (``transformer.h.0.attn.c_attn.weight``...): our tensors through :func:`gpt.weights.hf_name_table`
    (refusing any that it does not name), zero q/k/v biases for a model without them, the vocabulary's
    padding rows cut off, an untied head as ``lm_head.weight``, a classifier's layer as ``score.weight`` with
    its bias moved into ``ln_f.bias``."""
    cfg = gpt.config
    ours = {k: v.detach().cpu() for k, v in gpt.state_dict().items()}
    table = hf_name_table(cfg)
    known = {name for name, _, _ in table} | {"head.weight"}
    unknown = sorted(set(ours) - known)
    if unknown:
        raise UserError(f"the model has tensors HF's GPT-2 has no place for: {unknown[:4]}"
                        f"{'...' if len(unknown) > 4 else ''} (a layer this export does not know)")
    V = cfg.vocab_size
    out = {f"transformer.{hf}": (ours[name].t() if transposed else ours[name]) for name, hf, transposed in table}
    out["transformer.wte.weight"] = out["transformer.wte.weight"][:V]  # (V, C): the padding rows go
    if not cfg.qkv_bias:
        for i in range(cfg.n_layers):
            proj = out[f"transformer.h.{i}.attn.c_attn.weight"]  # (C, 3C)
            out[f"transformer.h.{i}.attn.c_attn.bias"] = proj.new_zeros(proj.shape[1])
    if head is not None:
        out["transformer.ln_f.bias"], out["score.weight"] = _fold_bias(head, out["transformer.ln_f.bias"])
    elif not cfg.tie_weights:
        out["lm_head.weight"] = ours["head.weight"][:V]  # (V, C)
    return {k: v.contiguous().clone() for k, v in out.items()}  # clone: no two names share memory


def _fold_bias(head: nn.Linear, ln_bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ln_f's new bias, the score weight (K, C)) so that ``score(x + new) == head(x + ln_bias)`` for any x."""
    W = head.weight.detach().cpu()  # (K, C)
    if head.bias is None:
        return ln_bias, W
    W64, c = W.double(), head.bias.detach().cpu().double()  # (K, C), (K,)
    shift = torch.linalg.pinv(W64) @ c  # (C,): the smallest s with W s = c
    new = (ln_bias.double() + shift).to(ln_bias.dtype)  # (C,)
    miss = (W64 @ (new.double() - ln_bias.double()) - c).abs().max().item()
    tol = max(FOLD_TOLERANCE, 8 * torch.finfo(ln_bias.dtype).eps) * (1.0 + c.abs().max().item())
    if not miss <= tol:
        raise UserError(f"the classifier's output bias cannot be moved into the final LayerNorm (off by {miss:.1e}: "
                        f"its weight is rank-deficient or ill-conditioned), and HF's GPT2ForSequenceClassification "
                        f"has no output bias")
    return new, W


def _labels(head: nn.Linear | None, labels) -> list[str] | None:
    if head is None:
        return None
    k = head.out_features
    labels = [f"LABEL_{i}" for i in range(k)] if labels is None else [str(x) for x in labels]
    if len(labels) != k or len(set(labels)) != k:
        raise UserError(f"the classifier has {k} classes: give {k} distinct labels, got {labels}")
    return labels


def hf_config(gpt: GPT, labels: list[str] | None, dtype: torch.dtype) -> dict:
    """config.json of HF's ``GPT2Config`` for ``gpt`` (a ``GPT2ForSequenceClassification`` with ``labels``)."""
    cfg = gpt.config
    p = cfg.dropout
    meta = {"architectures": ["GPT2LMHeadModel" if labels is None else "GPT2ForSequenceClassification"],
            "model_type": "gpt2", "vocab_size": cfg.vocab_size, "n_positions": cfg.context_length,
            "n_ctx": cfg.context_length, "n_embd": cfg.emb_dim, "n_layer": cfg.n_layers, "n_head": cfg.n_heads,
            "n_inner": None, "activation_function": "gelu_new",  # the tanh GELU, ours
            "resid_pdrop": p, "embd_pdrop": p, "attn_pdrop": p,  # our one dropout rate is all three
            "layer_norm_epsilon": cfg.layer_norm_eps, "initializer_range": 0.02, "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False, "use_cache": True,
            "tie_word_embeddings": cfg.tie_weights, "bos_token_id": EOT_ID, "eos_token_id": EOT_ID,
            "torch_dtype": str(dtype).removeprefix("torch.")}
    if labels is not None:  # HF's classifier reads the last token that is not padding: ours pads with EOT
        meta.update(id2label={str(i): name for i, name in enumerate(labels)},
                    label2id={name: i for i, name in enumerate(labels)},
                    pad_token_id=EOT_ID, problem_type="single_label_classification")
    meta[EXPORT_KEY] = {"config": cfg.to_dict()}
    return meta


def tokenizer_config(max_length: int, pad: bool) -> dict:
    """What AutoTokenizer needs beside vocab.json and merges.txt: GPT-2's byte-level BPE, <|endoftext|> as its
    one special token, no spaces "cleaned up" on decoding (tiktoken's decode gives back the text exactly)."""
    special = {"content": EOT_TOKEN, "lstrip": False, "rstrip": False, "normalized": True, "single_word": False,
               "special": True}
    out = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": max_length, "add_prefix_space": False,
           "add_bos_token": False, "errors": "replace", "clean_up_tokenization_spaces": False,
           "bos_token": EOT_TOKEN, "eos_token": EOT_TOKEN, "unk_token": EOT_TOKEN,
           "added_tokens_decoder": {str(EOT_ID): special}}
    if pad:
        out["pad_token"] = EOT_TOKEN  # a classifier's batches are padded with it, as in training
    return out


def _prepare_dir(directory, force: bool) -> Path:
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise UserError(f"{directory} is a file: give a directory to export to")
    if directory.exists() and any(directory.iterdir()):
        if not force:
            raise UserError(f"{directory} is not empty: give a new or empty directory, or --force (force=True) to "
                            f"write over the Hugging Face files in it")
        if holds_run(directory) or (directory / "finetune.json").exists():
            raise UserError(f"{directory} holds a training run of this project: export into another directory")
        for name in SHADOWING:
            (directory / name).unlink(missing_ok=True)
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def _write_json(path: Path, data: dict) -> None:
    atomic_write(path, lambda p: p.write_text(json.dumps(data, indent=2) + "\n"))


# ------------------------------------------------------------------------------------------ a run directory


def export_run(run, directory, force: bool = False) -> tuple[Path, str]:
    """Export a run directory of this project (what ``gpt export RUN --to DIR`` does): (the directory, what
    was exported, in words)."""
    from .finetune import FINETUNE_FILE, load_finetuned  # the finetuning code only when a run needs it
    from .weights import load_checkpoint

    run = need(run, "directory", "run directory", "give a directory that gpt train or gpt finetune-* wrote")
    if Path(directory).resolve() == run.resolve():
        raise UserError(f"--to {directory} is the run itself: export into another directory")
    if (run / FINETUNE_FILE).exists():
        model, meta = load_finetuned(run)
        labels = meta.get("labels") if isinstance(model, GPTClassifier) else None
        what = ("a classifier (GPT2ForSequenceClassification, labels " + ", ".join(labels) + ")" if labels
                else "an instruction model (GPT2LMHeadModel)")
        if meta.get("lora"):
            what += ", its LoRA adapters merged"
    else:
        model, labels, what = load_checkpoint(run), None, "a language model (GPT2LMHeadModel)"
    return export_hf(model, directory, labels=labels, force=force), what
