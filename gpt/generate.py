"""Text generation: greedy decoding, temperature, top-k and top-p (nucleus) sampling, with a KV cache.

``generate`` returns whole sequences; ``generate_stream`` yields each new token as soon as it is chosen;
``decode_stream`` turns a stream of token ids into text pieces.

How a step works
    With the cache (``use_cache=True``, the default), a prefill pass runs the prompt once and stores every
    layer's keys and values (:mod:`gpt.kv_cache`); each later step feeds only the newest token. Without
    it, each step runs the model over the whole text again, as the book's ``generate_text_simple`` does.
    Greedy decoding gives the same tokens either way (tested).

When the text outgrows the context (slide and recompute)
    The model sees at most ``context_length`` tokens. Past that, both paths slide the window: the next
    token is chosen from the last ``context_length`` tokens, at positions 0, 1, ... (the returned sequence
    keeps every token). GPT-2's positions are absolute and baked into every cached key and value, so once
    the window slides nothing cached is valid any more: the cached path then empties its cache and
    prefills the new window, every step. Past the context a step therefore costs what it costs without a
    cache, and the tokens stay exactly those of the plain path (tested).

Batches of prompts of different lengths (left padding)
    A list of token-id lists may hold prompts of any lengths. They are left-padded to the longest and
    each row gets its own positions (0 at its first real token), so every row's newest token sits in the
    same column and a step stays one batched forward. Padding is never attended to: the cached path masks
    it (torch's attention with an explicit mask, see :mod:`gpt.kv_cache`), and the plain path runs rows
    of equal padding together, cropped to their real tokens. Each row stops at its own ``eos_id``; the
    result is the list of per-row sequences, each equal to what generating that prompt alone gives
    (greedy; tested). Finished rows still ride along in the batch until every row is done.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable, Iterator

import torch

from gpt_kernels.backend import planning

from .errors import UserError
from .kv_cache import KVCache

NOT_FINITE = ("the model's next-token scores are not numbers (nan or inf): its weights hold nan/inf, or its dtype "
              "overflowed; try --dtype float32, or another checkpoint")


def check_sampling_args(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None,
                        flags: bool = False) -> None:
    """Clear errors for sampling settings that make no sense; ``flags``: name them as the command line's
    options (``--top-k``), not as this module's parameters (``top_k``)."""
    def name(p: str) -> str:
        return "--" + p.replace("_", "-") if flags else p

    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise UserError(f"{name('max_new_tokens')} must be a non-negative integer, got {max_new_tokens!r}")
    if temperature < 0:
        raise UserError(f"{name('temperature')} must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        off = "0 = off" if flags else "or None for no top-k"
        raise UserError(f"{name('top_k')} must be a positive integer ({off}), got {top_k!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise UserError(f"{name('top_p')} must be in (0, 1], got {top_p}")


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """One next-token id per row from (B, V) logits: greedy at temperature 0, else sampled. Returns (B, 1)."""
    if temperature == 0.0:
        return logits.argmax(dim=-1, keepdim=True)  # (B, 1)
    logits = logits.float() / temperature  # (B, V)
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1), the k-th largest
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)  # (B, V)
        drop_sorted = cum - torch.softmax(sorted_logits, dim=-1) >= top_p  # keep the smallest set reaching p
        drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    probs = torch.softmax(logits, dim=-1)  # (B, V)
    try:
        return torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)
    except RuntimeError as e:  # "probability tensor contains either inf, nan or element < 0"
        raise UserError(NOT_FINITE) from e


# ------------------------------------------------------------------------------------------ the prompts


def _prompt_rows(idx) -> tuple[list[torch.Tensor], str]:
    """The prompts as a list of 1-D id tensors, and the input's kind: "row" (one prompt: a (T,) tensor or a
    list of ints), "tensor" (a (B, T) tensor) or "list" (a list of token-id lists, any lengths)."""
    if isinstance(idx, torch.Tensor):
        if idx.dim() == 1:
            rows, kind = [idx], "row"
        elif idx.dim() == 2 and idx.shape[0] > 0:
            rows, kind = list(idx), "tensor"
        else:
            rows, kind = [], "tensor"
        if not rows or idx.shape[-1] == 0:
            raise UserError(f"the prompt must be a non-empty (T,) or (B, T) sequence of token ids, got shape "
                            f"{tuple(idx.shape)}")
        return rows, kind
    if isinstance(idx, (list, tuple)) and idx and all(isinstance(r, (list, tuple, torch.Tensor)) for r in idx):
        rows = []
        for i, r in enumerate(idx):
            t = torch.as_tensor(r, dtype=torch.long)
            if t.dim() != 1 or t.numel() == 0:
                raise UserError(f"prompt {i} of the batch is empty or not a flat list of token ids (shape "
                                f"{tuple(t.shape)}): every prompt needs at least one token")
            rows.append(t)
        return rows, "list"
    t = torch.as_tensor(idx, dtype=torch.long)
    if t.dim() != 1 or t.numel() == 0:
        raise UserError(f"the prompt must be a non-empty (T,) or (B, T) sequence of token ids, got shape "
                        f"{tuple(t.shape)}")
    return [t], "row"


def _left_pad(rows: list[torch.Tensor], extra: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-align the prompts in a (B, P + extra) buffer (P = the longest prompt; room for ``extra`` new
    tokens) and return it with each row's padding, (B,)."""
    lengths = torch.tensor([len(r) for r in rows])  # (B,)
    P = int(lengths.max())
    buf = torch.zeros(len(rows), P + extra, dtype=torch.long, device=device)  # (B, P + extra), 0 = padding
    for b, r in enumerate(rows):
        buf[b, P - len(r):P] = r.to(device=device, dtype=torch.long)
    return buf, (P - lengths).to(device)  # (B, P + extra), (B,)


# ------------------------------------------------------------------------- next-token logits, two ways


class _PlainLogits:
    """Next-token logits without a cache: the model runs over the whole (cropped) text every step.

    Rows with the same padding run together, on their real tokens only, so no mask is needed.
    """

    def __init__(self, model, buf: torch.Tensor, pad: torch.Tensor):
        self.model, self.buf, self.ctx = model, buf, model.config.context_length
        self.groups = [(p, (pad == p).nonzero()[:, 0]) for p in sorted(set(pad.tolist()))]  # (pad, rows)

    def __call__(self, end: int) -> torch.Tensor:
        """Logits (B, V) for the token after columns [0, end) of the buffer."""
        lo = max(end - self.ctx, 0)  # the sliding window: the last ctx tokens
        if len(self.groups) == 1:  # no row padded: one forward, as the book does it
            return self.model(self.buf[:, lo:end], last_only=True)[:, -1]  # (B, V)
        out = None
        for p, rows in self.groups:
            logits = self.model(self.buf[rows, max(lo, p):end], last_only=True)[:, -1]  # (b, V)
            if out is None:
                out = logits.new_empty(self.buf.shape[0], logits.shape[-1])  # (B, V)
            out[rows] = logits
        return out


class _CachedLogits:
    """Next-token logits with a KV cache: prefill once, then one token per step.

    The cache's slot 0 holds buffer column ``start``. When a new token would not fit any more (the text
    has outgrown the context), the window slides: the cache is emptied and the last ``max_len`` tokens
    are prefilled again at positions 0, 1, ...: what the plain path computes at that step.
    """

    def __init__(self, model, buf: torch.Tensor, pad: torch.Tensor, max_len: int):
        self.model, self.buf, self.pad = model, buf, pad
        self.cache = KVCache.for_model(model, buf.shape[0], max_len)  # (B, H, max_len, D) per layer, k and v
        self.start: int | None = None  # buffer column of cache slot 0; None before the prefill

    def __call__(self, end: int) -> torch.Tensor:
        """Logits (B, V) for the token after columns [0, end) of the buffer."""
        cache = self.cache
        if self.start is None or end - self.start > cache.max_len:  # prefill, or slide and recompute
            self.start = max(end - cache.max_len, 0)
            cache.reset(pad=(self.pad - self.start).clamp(min=0))  # (B,) padding left in the window
        new = self.buf[:, self.start + cache.length:end]  # (B, T): T = window on a prefill, else 1
        return self.model(new, cache=cache, last_only=True)[:, -1]  # (B, V)


# ---------------------------------------------------------------------------------------- the decoder


def _decode_steps(model, buf: torch.Tensor, pad: torch.Tensor, max_new_tokens: int, temperature: float,
                  top_k: int | None, top_p: float | None, eos_id: int | None, seed: int | None,
                  use_cache: bool) -> Iterator[torch.Tensor]:
    """Choose up to ``max_new_tokens`` tokens for the right-aligned prompts in ``buf`` (B, P + max_new_tokens),
    writing each into the buffer and yielding it, (B,). A finished row gets ``eos_id`` from then on."""
    B, P = buf.shape[0], buf.shape[1] - max_new_tokens
    generator = None
    if seed is not None and temperature > 0:
        generator = torch.Generator(device=buf.device).manual_seed(seed)
    if use_cache:  # the longest the window ever gets: the context, or all the text if that is shorter
        next_logits = _CachedLogits(model, buf, pad, min(model.config.context_length, P + max_new_tokens))
    else:
        next_logits = _PlainLogits(model, buf, pad)
    finished = torch.zeros(B, dtype=torch.bool, device=buf.device)  # (B,)
    for step in range(max_new_tokens):
        end = P + step  # columns [0, end) hold the text so far
        logits = next_logits(end)  # (B, V)
        # once: a sync; later steps sample or argmax. Not while a plan records the kernel launches without
        # running them (gpt_kernels.precompile): the logits are then never computed
        if step == 0 and planning() is None and not bool(torch.isfinite(logits).all()):
            raise UserError(NOT_FINITE)
        nxt = sample_next(logits, temperature, top_k, top_p, generator)[:, 0]  # (B,)
        if eos_id is not None:
            nxt = torch.where(finished, torch.full_like(nxt, eos_id), nxt)
            finished |= nxt == eos_id
        buf[:, end] = nxt
        yield nxt
        if eos_id is not None and bool(finished.all()):
            return


def _start(model, idx, max_new_tokens, temperature, top_k, top_p):
    """Check the arguments and lay out the prompts: (buf, pad, rows, kind)."""
    check_sampling_args(max_new_tokens, temperature, top_k, top_p)
    rows, kind = _prompt_rows(idx)
    ctx = model.config.context_length
    for i, r in enumerate(rows):
        if len(r) > ctx:
            which = "the prompt" if len(rows) == 1 else f"prompt {i} of the batch"
            raise UserError(f"{which} has {len(r)} tokens but the model's context length is {ctx}: "
                            f"shorten it to at most {ctx} tokens")
    buf, pad = _left_pad(rows, max_new_tokens, model.device)
    return buf, pad, rows, kind


def generate_stream(model, idx, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
                    top_p: float | None = None, eos_id: int | None = None, seed: int | None = None,
                    use_cache: bool = True) -> Iterator:
    """Like :func:`generate`, but yields each step's new tokens as soon as they are chosen.

    One prompt (a (T,) tensor or a list of ints) yields an ``int`` per step and stops after ``eos_id``.
    A batch (a (B, T) tensor or a list of token-id lists) yields a list of B ints per step, in which a
    finished row repeats ``eos_id``; it stops once every row has finished. Bad arguments raise here, at
    the call, before anything is generated.
    """
    buf, pad, rows, kind = _start(model, idx, max_new_tokens, temperature, top_k, top_p)
    return _stream(model, buf, pad, kind, max_new_tokens, temperature, top_k, top_p, eos_id, seed, use_cache)


@torch.no_grad()
def _stream(model, buf, pad, kind, max_new_tokens, temperature, top_k, top_p, eos_id, seed, use_cache):
    was_training = model.training
    model.eval()
    try:
        for nxt in _decode_steps(model, buf, pad, max_new_tokens, temperature, top_k, top_p, eos_id, seed,
                                 use_cache):
            ids = nxt.tolist()
            yield ids[0] if kind == "row" else ids
    finally:
        model.train(was_training)


@torch.no_grad()
def generate(model, idx, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, eos_id: int | None = None, seed: int | None = None,
             use_cache: bool = True):
    """Extend prompts by up to ``max_new_tokens`` tokens each; returns the whole sequences.

    ``idx`` is one prompt, a (T,) tensor or a list of ints (returns a (T + n,) tensor); a batch of
    equal-length prompts, a (B, T) tensor (returns (B, T + n)); or a batch of any lengths, a list of
    token-id lists (returns a list of per-row lists). A row that produces ``eos_id`` is finished: in a
    list result its sequence ends there, in a tensor it is padded with ``eos_id`` while other rows go on.
    Generation stops once every row has finished.

    ``use_cache`` (default) keeps each layer's keys and values between steps; ``False`` reruns the model
    over the whole text every step (slow; the tokens are the same). Past the context length the window
    slides on both paths (see the module's docstring).
    """
    buf, pad, rows, kind = _start(model, idx, max_new_tokens, temperature, top_k, top_p)
    was_training = model.training
    model.eval()
    n = 0
    try:
        for _ in _decode_steps(model, buf, pad, max_new_tokens, temperature, top_k, top_p, eos_id, seed,
                               use_cache):
            n += 1
    finally:
        model.train(was_training)
    P = buf.shape[1] - max_new_tokens
    if kind == "row":
        return buf[0, :P + n]  # (T + n,)
    if kind == "tensor":
        return buf[:, :P + n]  # (B, T + n): no row is padded
    out = []
    for r, new in zip(rows, buf[:, P:P + n].tolist()):
        if eos_id is not None and eos_id in new:
            new = new[:new.index(eos_id) + 1]  # the row stopped at its own end-of-text
        out.append(r.tolist() + new)
    return out


def decode_stream(ids: Iterable[int], tokenizer=None) -> Iterator[str]:
    """Text pieces for a stream of token ids, each as soon as it is complete.

    A GPT-2 token is a run of bytes, and one character's UTF-8 bytes may be split over two tokens (many
    emoji and CJK characters are): an incremental UTF-8 decoder holds a split character back until its
    last byte arrives. The pieces join to exactly ``tokenizer.decode(ids)``.
    """
    if tokenizer is None:
        from .tokenizer import get_tokenizer

        tokenizer = get_tokenizer()
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")  # tiktoken's decode uses "replace" too
    for i in ids:
        piece = utf8.decode(tokenizer.decode_single_token_bytes(int(i)))
        if piece:
            yield piece
    tail = utf8.decode(b"", final=True)  # a character cut off at the very end becomes U+FFFD
    if tail:
        yield tail
