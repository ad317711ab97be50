"""Text generation: greedy decoding, temperature, top-k and top-p (nucleus) sampling."""

from __future__ import annotations

import torch


def check_sampling_args(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Clear errors for sampling settings that make no sense."""
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


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
    return torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)


@torch.no_grad()
def generate(model, idx, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, eos_id: int | None = None, seed: int | None = None) -> torch.Tensor:
    """Extend ``idx`` (B, T) or (T,) by up to ``max_new_tokens`` tokens; returns the whole sequence.

    The model sees at most its context length: as the text grows past it, the oldest tokens are
    cropped from what the model sees (a sliding window; the returned sequence keeps them all). A row
    that produces ``eos_id`` is finished: it gets ``eos_id`` as padding while other rows go on, and
    generation stops once every row has finished.
    """
    check_sampling_args(max_new_tokens, temperature, top_k, top_p)
    if not isinstance(idx, torch.Tensor):
        idx = torch.tensor(idx, dtype=torch.long)
    squeeze = idx.dim() == 1
    if squeeze:
        idx = idx[None, :]  # (1, T)
    if idx.dim() != 2 or idx.shape[1] == 0:
        raise ValueError(f"the prompt must be a non-empty (T,) or (B, T) sequence of token ids, got shape "
                         f"{tuple(idx.shape)}")
    ctx = model.config.context_length
    if idx.shape[1] > ctx:
        raise ValueError(f"the prompt has {idx.shape[1]} tokens but the model's context length is {ctx}: "
                         f"shorten the prompt to at most {ctx} tokens")
    idx = idx.to(model.device)
    generator = None
    if seed is not None and temperature > 0:
        generator = torch.Generator(device=idx.device).manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        finished = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)  # (B,)
        for _ in range(max_new_tokens):
            logits = model(idx[:, -ctx:])[:, -1, :]  # (B, V), the last position only
            nxt = sample_next(logits, temperature, top_k, top_p, generator)  # (B, 1)
            if eos_id is not None:
                nxt = torch.where(finished[:, None], torch.full_like(nxt, eos_id), nxt)
                finished |= nxt[:, 0] == eos_id
            idx = torch.cat([idx, nxt], dim=1)  # (B, T + 1)
            if eos_id is not None and bool(finished.all()):
                break
    finally:
        model.train(was_training)
    return idx[0] if squeeze else idx
