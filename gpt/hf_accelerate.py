"""Run a transformers GPT-2 on our kernels: ``gpt.accelerate_hf(model)``.

    from transformers import GPT2LMHeadModel
    from gpt import accelerate_hf
    model = GPT2LMHeadModel.from_pretrained("gpt2/")
    replaced = accelerate_hf(model)             # {"transformer.h.0.ln_1": "layer_norm", ...}
    loss = model(input_ids, labels=input_ids).loss   # HF's Trainer, PEFT, generate() work as before

For an in-memory ``GPT2LMHeadModel``, ``GPT2Model`` or ``GPT2ForSequenceClassification`` (4.x or 5.x
transformers), in place, keeping every parameter and the state dict as they are:

- each ``nn.LayerNorm`` runs ``gpt_kernels.layer_norm``;
- each MLP runs its first projection without its bias, then ``gpt_kernels.bias_gelu`` (bias + tanh GELU in one
  pass); a ``c_fc`` that something else wrapped since (a PEFT LoRA layer) keeps its own forward, and the GELU
  alone runs on ``gpt_kernels.gelu``;
- attention runs ``gpt_kernels.attention`` (causal, with attention dropout in the kernel), registered in
  transformers' attention-function registry (``AttentionInterface``) under the name ``gpt_triton``, with
  SDPA's mask function so that a batch without padding reaches it with no mask. A batch that needs a mask
  (padding, packed sequences, a prefill after a cache) goes to transformers' SDPA function unchanged;
- ``GPT2LMHeadModel`` in training mode, given labels: the loss is ``gpt_kernels.linear_cross_entropy``, the
  chunked head + cross-entropy, so the (tokens x vocabulary) logits are never built (the output's logits
  are None; ``fused_loss=False`` keeps HF's head and loss). Trainer's ``num_items_in_batch`` (the token count
  of an accumulated step) and ``shift_labels`` are honoured. In eval mode, or without labels, HF's own head.

Which backend runs the ops is ``kernel_backend`` (None: ``gpt_kernels``' setting: Triton on CUDA tensors,
PyTorch's ops on CPU tensors), fixed per op at its forward.

What it cannot serve it refuses in one line instead of computing something else: at the call, a head mask,
``output_attentions``, cross-attention inputs; at the call to ``accelerate_hf``, a config with
cross-attention, a non-causal GPT-2, an activation other than GELU, a head size the attention kernel does
not have, or a transformers whose GPT-2 has no attention-function registry with mask functions (4.55 and newer have).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types

import torch
import torch.nn as nn
import torch.nn.functional as F

import gpt_kernels
from gpt_kernels.backend import use_backend
from gpt_kernels.flash_attention import SUPPORTED_HEAD_DIMS

from .errors import UserError

ATTENTION_NAME = "gpt_triton"  # our attention function's name in transformers' registry
GELU_APPROXIMATE = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh", "gelu": "none"}
REFUSED_AT_CALL = {"head_mask": "a head mask", "encoder_hidden_states": "cross-attention inputs",
                   "output_attentions": "output_attentions (the kernel never forms the attention weights)"}
MARK = "_gpt_triton_accelerated"  # on an accelerated model: what accelerate_hf replaced
_NOT_OURS = object()  # the backend of an attention module accelerate_hf has not seen


def accelerate_hf(model: nn.Module, kernel_backend: str | None = None, fused_loss: bool = True) -> dict[str, str]:
    """Run ``model``'s LayerNorms, MLP GELUs (bias fused), attention and (``GPT2LMHeadModel``, training,
    with labels, ``fused_loss``) its loss on ``gpt_kernels``, in place. Returns what was replaced: module
    name -> the op that now runs it. Calling it again changes nothing and returns the same."""
    hf = _transformers_gpt2()
    if not isinstance(model, (hf.GPT2LMHeadModel, hf.GPT2Model, hf.GPT2ForSequenceClassification)):
        raise TypeError(f"accelerate_hf takes a transformers GPT2LMHeadModel, GPT2Model or "
                        f"GPT2ForSequenceClassification, got {type(model).__name__}")
    if hasattr(model, MARK):
        return dict(getattr(model, MARK))
    approximate = _check_config(model.config, hf)
    original_attention = model.config._attn_implementation
    replaced = {}
    for name, m in model.named_modules():
        if type(m) is nn.LayerNorm:
            _bind(m, _layer_norm_forward, kernel_backend)
            m.gpt_triton_keep_dtype = name.endswith("ln_f")  # the model's output: the dtype HF gives
            replaced[name] = "layer_norm"
        elif isinstance(m, hf.GPT2MLP):
            _bind(m, _mlp_forward, kernel_backend)
            m.gpt_triton_gelu, m.gpt_triton_conv1d = approximate, hf.Conv1D
            replaced[name] = "bias_gelu"
        elif isinstance(m, hf.GPT2Attention):
            m.gpt_triton_backend = kernel_backend
            replaced[name] = f"attention (was {original_attention})"
    model.config._attn_implementation = ATTENTION_NAME  # read by every GPT2Attention and the mask builder
    if isinstance(model, hf.GPT2LMHeadModel) and fused_loss:
        replaced["lm_head"] = "linear_cross_entropy (training, with labels)"
    _wrap_forward(model, kernel_backend, fused_loss and isinstance(model, hf.GPT2LMHeadModel))
    setattr(model, MARK, dict(replaced))
    return replaced


# ------------------------------------------------------------------------------------------ transformers


@dataclasses.dataclass(frozen=True)
class _HF:
    """The parts of transformers this module uses, looked up once."""

    GPT2LMHeadModel: type
    GPT2Model: type
    GPT2ForSequenceClassification: type
    GPT2MLP: type
    GPT2Attention: type
    Conv1D: type
    sdpa: object  # transformers' SDPA attention function: what a batch that needs a mask runs
    output: type  # CausalLMOutputWithCrossAttentions
    output_fields: frozenset  # its fields but loss and logits: what the fused loss copies from the transformer's


_HF_PARTS: list[_HF] = []


def _transformers_gpt2() -> _HF:
    """transformers' GPT-2 classes, with our attention function and its mask function registered (once)."""
    if _HF_PARTS:
        return _HF_PARTS[0]
    try:
        import transformers
        from transformers.models.gpt2 import modeling_gpt2 as m
    except ImportError:
        raise ImportError("accelerate_hf needs transformers: pip install transformers") from None
    try:
        from transformers import AttentionInterface
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError:
        AttentionInterface = None
    if AttentionInterface is None or not hasattr(m, "create_causal_mask"):
        raise RuntimeError(f"transformers {transformers.__version__}'s GPT-2 has no attention-function registry with "
                           f"mask functions, which accelerate_hf plugs its attention into: upgrade to 4.55 or newer "
                           f"(pip install -U transformers)")
    AttentionInterface.register(ATTENTION_NAME, _attention)
    AttentionMaskInterface.register(ATTENTION_NAME, _mask_function(AttentionMaskInterface._global_mapping["sdpa"]))
    conv1d = getattr(m, "Conv1D", None) or transformers.pytorch_utils.Conv1D
    output = m.CausalLMOutputWithCrossAttentions
    fields = frozenset(f.name for f in dataclasses.fields(output)) - {"loss", "logits"}
    _HF_PARTS.append(_HF(m.GPT2LMHeadModel, m.GPT2Model, m.GPT2ForSequenceClassification, m.GPT2MLP,
                         m.GPT2Attention, conv1d, sdpa_attention_forward, output, fields))
    return _HF_PARTS[0]


def _mask_function(sdpa_mask):
    """SDPA's mask function (None for a batch that needs no mask), which also gives None under torch.compile
    when nothing but causality is asked for: no padding mask, the query as long as the keys (no cache), no
    packed sequences or windows (transformers then forbids the skip). transformers 4.x materialises the mask
    whenever it is traced, which would send a compiled model's attention to SDPA."""

    def mask(**kwargs):
        q_len = kwargs["q_length"] if "q_length" in kwargs else kwargs["cache_position"].shape[0]
        offset = kwargs.get("kv_offset", 0)  # a tensor for a static cache: not this case
        if (torch.compiler.is_compiling() and kwargs.get("allow_is_causal_skip", True)
                and kwargs.get("attention_mask") is None and q_len == kwargs["kv_length"]
                and isinstance(offset, int) and offset == 0 and kwargs.get("local_size") is None):
            return None
        return sdpa_mask(**kwargs)

    return mask


def _check_config(cfg, hf: _HF) -> str:
    """The GELU's ``approximate`` for ``cfg``, or a one-line refusal of what the kernels cannot compute."""
    head_dim = cfg.n_embd // cfg.n_head
    problems = []
    if getattr(cfg, "add_cross_attention", False):
        problems.append("cross-attention (add_cross_attention=True)")
    if not getattr(cfg, "is_causal", True):
        problems.append("non-causal attention (is_causal=False)")
    if cfg.activation_function not in GELU_APPROXIMATE:
        problems.append(f"activation_function={cfg.activation_function!r} (the kernels have GELU: "
                        f"{', '.join(GELU_APPROXIMATE)})")
    if head_dim not in SUPPORTED_HEAD_DIMS:
        problems.append(f"head size {head_dim} (the attention kernel takes {SUPPORTED_HEAD_DIMS})")
    if problems:
        raise UserError(f"accelerate_hf cannot run this GPT-2 on its kernels without changing what it computes: "
                        f"{'; '.join(problems)}")
    return GELU_APPROXIMATE[cfg.activation_function]


def _bind(module: nn.Module, forward, kernel_backend: str | None) -> None:
    module.forward = types.MethodType(forward, module)
    module.gpt_triton_backend = kernel_backend


# ------------------------------------------------------------------------------------------ the replacements


def _layer_norm_forward(self: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    with use_backend(self.gpt_triton_backend):
        y = gpt_kernels.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)  # (..., C)
    # under autocast the kernel hands the next matmul autocast's dtype (which that matmul would round to);
    # the final norm's output leaves the model, in the dtype nn.LayerNorm gives it
    return y.to(torch.promote_types(x.dtype, self.weight.dtype)) if self.gpt_triton_keep_dtype else y


def _mlp_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    fc = self.c_fc
    with use_backend(self.gpt_triton_backend):
        if type(fc) is self.gpt_triton_conv1d:  # Conv1D: x @ W + b, W (C, 4C)
            h = gpt_kernels.bias_gelu(torch.matmul(x, fc.weight), fc.bias, self.gpt_triton_gelu)  # (B, T, 4C)
        else:  # wrapped since (a PEFT LoRA layer): its own forward, then the GELU alone
            h = gpt_kernels.gelu(fc(x), approximate=self.gpt_triton_gelu)  # (B, T, 4C)
    return self.dropout(self.c_proj(h))  # (B, T, C)


def _attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
               head_mask=None, **kwargs):
    """transformers' attention-function signature: q (B, H, Tq, D), k and v (B, H, Tk, D) -> ((B, Tq, H, D),
    no weights). A call with a mask, or a module not of ours, goes to transformers' SDPA function."""
    if head_mask is not None:
        raise UserError("accelerate_hf's attention cannot apply a head mask: call the model without head_mask")
    if scaling is None:  # transformers 4.x passes none: GPT-2's own rule, as its eager attention applies it
        scaling = _gpt2_scale(module, query.shape[-1])
    backend = getattr(module, "gpt_triton_backend", _NOT_OURS)
    if attention_mask is not None or backend is _NOT_OURS or not getattr(module, "is_causal", True):
        return _HF_PARTS[0].sdpa(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                 is_causal=is_causal, **kwargs)
    with use_backend(backend):
        out = gpt_kernels.attention(query, key, value, causal=True, dropout_p=dropout, scale=scaling)  # (B, H, Tq, D)
    return out.transpose(1, 2), None  # (B, Tq, H, D)


def _gpt2_scale(module, head_dim: int) -> float:
    """GPT-2's score scale: 1/sqrt(D) (``scale_attn_weights``), further / (layer + 1)
    (``scale_attn_by_inverse_layer_idx``)."""
    scale = head_dim ** -0.5 if getattr(module, "scale_attn_weights", True) else 1.0
    if getattr(module, "scale_attn_by_inverse_layer_idx", False):
        scale /= float(module.layer_idx + 1)
    return scale


# ------------------------------------------------------------------------------------------ the model's forward


def _wrap_forward(model: nn.Module, kernel_backend: str | None, fused_loss: bool) -> None:
    """The model's forward, refusing what the kernels cannot serve, and for a language model taking the
    fused loss in training mode when labels are given. Bound to the model (nothing in it refers to this
    instance), so a deep copy of the model runs its own weights."""
    cls_forward = type(model).forward  # the class's, with transformers' decorators
    names = _positional_names(cls_forward)[1:]  # once, without self: inspect has no place in a traced forward

    @functools.wraps(cls_forward)  # its signature: the Trainer reads the argument names from it
    def forward(self, *args, **kwargs):
        named = {**dict(zip(names, args)), **kwargs}
        _refuse_call(self, named)
        if (fused_loss and self.training and named.get("labels") is not None and type(self.lm_head) is nn.Linear
                and not named.get("logits_to_keep")):
            return _fused_loss_forward(self, named, self.gpt_triton_backend)
        return cls_forward(self, *args, **kwargs)

    model.forward = types.MethodType(forward, model)
    model.gpt_triton_backend = kernel_backend


def _positional_names(fn) -> list[str]:
    """The names of ``fn``'s arguments that can be given by position, in order."""
    return [p.name for p in inspect.signature(fn).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _refuse_call(model: nn.Module, named: dict) -> None:
    for key, what in REFUSED_AT_CALL.items():
        if named.get(key) not in (None, False):
            raise UserError(f"accelerate_hf's GPT-2 cannot serve {what}: call it without {key}")
    if getattr(model.config, "output_attentions", False):
        raise UserError("accelerate_hf's GPT-2 cannot serve output_attentions (the kernel never forms the "
                        "attention weights): set model.config.output_attentions = False")


def _fused_loss_forward(model: nn.Module, named: dict, kernel_backend: str | None):
    """GPT2LMHeadModel's forward with the loss from the chunked linear + cross-entropy: (loss, no logits)."""
    named = dict(named)
    labels = named.pop("labels")
    shift_labels = named.pop("shift_labels", None)
    num_items = named.pop("num_items_in_batch", None)
    ignore_index = named.pop("ignore_index", -100)
    return_dict = named.pop("return_dict", None)
    named.pop("logits_to_keep", None)
    out = model.transformer(**named)
    h = out[0]  # (B, T, C): the final-normed hidden states
    if shift_labels is None:  # position t predicts token t + 1; the last position predicts nothing
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]  # (B, T)
    W = model.lm_head.weight  # (V, C)
    with use_backend(kernel_backend):
        loss = gpt_kernels.linear_cross_entropy(h.reshape(-1, h.shape[-1]), W, shift_labels.reshape(-1).to(h.device),
                                                bias=model.lm_head.bias, ignore_index=ignore_index,
                                                reduction="mean" if num_items is None else "sum")
    if num_items is not None:  # HF's rule for an accumulated step: the sum over the tokens of all its batches
        loss = loss / (num_items.to(loss.device) if torch.is_tensor(num_items) else num_items)
    hf = _HF_PARTS[0]
    extra = {k: v for k, v in out.items() if k in hf.output_fields} if hasattr(out, "items") else {}
    result = hf.output(loss=loss, logits=None, **extra)
    use_dict = return_dict if return_dict is not None else getattr(model.config, "return_dict", True)
    return result if use_dict else result.to_tuple()
