"""How fast does the model write text, and how much does the KV cache buy?

New tokens per second of ``gpt.generate`` for gpt2-small (random weights: speed does not depend on them),
greedy, every row running the full ``new_tokens`` (no end-of-text), the prompt's prefill included:

    tokens/s = rows x new_tokens / seconds

for 1 prompt and a batch of 8 equal-length prompts, with the KV cache (prefill once, then one token per
step) and without it (the whole text rerun every step, as the book's ``generate_text_simple``), plus one
batch of 8 prompts of different lengths with the cache (left padding: torch's attention with a mask).
``speedup`` is cache over no cache in the same run. Weights and cache are bfloat16 on a GPU, float32 on
the CPU; the GPU's name, torch and the CPU thread count are recorded with every row.

The anchor: the KV-cache bonus of "Build a Large Language Model (From Scratch)" reports about 5x over no
cache for the 124M model on a CPU; the goal here is at least that on the CPU and 10x on a GPU.

    python -m bench.bench_generate                    # 256 new tokens (slow on a CPU without the cache)
    python -m bench.bench_generate --quick            # 32 new tokens
    python -m bench.bench_generate --new-tokens 256 --batch-sizes 1 --threads 1
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import torch

from bench.common import add_output_args, format_table, results_dir, save_results

METRIC = "tokens_per_s"  # higher is better
PRESET = "gpt2-small"  # the model timed (random weights)
PROMPT_TOKENS = 16  # the prompt: the first tokens of The Verdict (a batch: 8 consecutive slices of it)


def prompts(batch: int, length: int = PROMPT_TOKENS, ragged: bool = False):
    """``batch`` prompts cut from The Verdict: a (batch, length) tensor, or a list of token-id lists whose
    lengths spread over [length / 2, length] when ``ragged``."""
    from gpt.tokenizer import asset_path, encode

    with open(asset_path("the-verdict.txt"), encoding="utf-8") as f:
        ids = encode(f.read())
    rows = [ids[b * length:(b + 1) * length] for b in range(batch)]
    if ragged:
        return [r[:length // 2 + (b * (length - length // 2)) // max(batch - 1, 1)] for b, r in enumerate(rows)]
    return torch.tensor(rows)  # (batch, length)


def load_model(preset: str = PRESET):
    """(model, dtype): ``preset`` with random weights (speed does not depend on them; seed 0), no dropout, in
    eval mode, bfloat16 on a GPU that has it, else float32, on the GPU if there is one."""
    from gpt import GPT

    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    torch.manual_seed(0)
    model = GPT.from_preset(preset, dropout=0.0).to(device="cuda" if cuda else "cpu", dtype=dtype).eval()
    return model, dtype


def decode_step(model, idx: torch.Tensor):
    """A closure running one step of the KV-cache path, the step ``generate`` repeats per new token: the
    forward of one new token per row (B, 1) after the prompts ``idx`` (B, P), whose keys and values are
    prefilled here, once. Each call decodes at position P again (the cache is rewound to the prompt), so
    every call does the same work. Returns the logits (B, 1, V)."""
    from gpt.kv_cache import KVCache

    B, P = idx.shape
    cache = KVCache.for_model(model, B, P + 1)  # (B, H, P + 1, D) per layer
    with torch.no_grad():
        model(idx, cache=cache, last_only=True)  # prefill: the prompts' keys and values in every layer
    token = idx[:, -1:]  # (B, 1): any token costs the same

    @torch.no_grad()
    def step():
        cache.length = P  # rewind: the new token goes into slot P again
        return model(token, cache=cache, last_only=True)  # (B, 1, V)

    return step


def decode_bytes(model, B: int, P: int) -> int:
    """Least traffic of one decoding step: each weight read once (the head's in full; of the embeddings only
    the rows used, a tied token embedding counted once, as the head) and each layer's cached keys and
    values (B, H, P, D) read once: ``(weights - embeddings + head) * e + 2 * layers * B * P * emb_dim * e``."""
    cfg, e = model.config, model.tok_emb.weight.element_size()
    embeddings = {id(p): p.numel() for p in (model.tok_emb.weight, model.pos_emb.weight, model.head.weight)}
    weights = model.num_parameters() - sum(embeddings.values()) + model.head.weight.numel()
    return weights * e + 2 * cfg.n_layers * B * P * cfg.emb_dim * e


def _seconds(fn, repeats: int) -> float:
    """Median wall-clock seconds of ``fn()`` (GPU work finished before the clock stops)."""
    cuda = torch.cuda.is_available()
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(quick: bool = False, new_tokens: int | None = None, batch_sizes=(1, 8), preset: str = PRESET,
        prompt_tokens: int = PROMPT_TOKENS, ragged: bool | None = None,
        no_cache_max_batch: int | None = None) -> list[dict]:
    """One row per (batch, cache on/off): tokens/s and the cache's speedup; ``quick``: 32 new tokens.

    ``no_cache_max_batch``: run the (slow) no-cache baseline only for batches up to this size; by default
    every batch on a GPU and batch 1 on a CPU, where 8 prompts x 256 tokens without the cache take ~11 min.
    """
    from gpt import generate

    cuda = torch.cuda.is_available()
    new_tokens = new_tokens or (32 if quick else 256)
    repeats = 3 if cuda else 1  # a CPU run without the cache takes minutes: once
    if ragged is None:  # the batch of prompts of different lengths: on a GPU; a CPU run spends ~4 min on it
        ragged = cuda
    if no_cache_max_batch is None:
        no_cache_max_batch = max(batch_sizes) if cuda else 1
    model, dtype = load_model(preset)
    cases = [(f"{b} prompt{'s' if b > 1 else ''}", prompts(b, prompt_tokens), b) for b in batch_sizes]
    if ragged and max(batch_sizes) > 1:
        b = max(batch_sizes)
        cases.append((f"{b} prompts, {prompt_tokens // 2}-{prompt_tokens} tokens",
                       prompts(b, prompt_tokens, ragged=True), b))
    generate(model, cases[0][1], 2)  # warm-up: allocator, kernels' autotuning, first-call costs
    rows = []
    for case, idx, batch in cases:
        is_ragged = isinstance(idx, list)
        for use_cache in (True, False) if not is_ragged and batch <= no_cache_max_batch else (True,):
            if cuda:
                generate(model, idx, 2, use_cache=use_cache)  # this shape's autotuning, off the clock
            s = _seconds(functools.partial(generate, model, idx, new_tokens, use_cache=use_cache), repeats)
            rows.append({"suite": "generate", "case": case, "impl": "kv cache" if use_cache else "no cache",
                         "preset": preset, "dtype": str(dtype).removeprefix("torch."), "batch": batch,
                         "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "seconds": s,
                         "tokens_per_s": batch * new_tokens / s, "ms_per_step": s * 1e3 / new_tokens,
                         "threads": torch.get_num_threads()})
            print(f"  {case}, {rows[-1]['impl']}: {rows[-1]['tokens_per_s']:.1f} tokens/s", flush=True)
    for r in rows:  # the cache's speedup over no cache, same case, same run
        base = next((b for b in rows if b["case"] == r["case"] and b["impl"] == "no cache"), None)
        r["speedup"] = r["tokens_per_s"] / base["tokens_per_s"] if base else None
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="32 new tokens instead of 256")
    p.add_argument("--new-tokens", type=int, default=None, help="new tokens per prompt (default 256; quick 32)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8], help="prompts per batch (default 1 8)")
    p.add_argument("--preset", default=PRESET, help=f"model size (default {PRESET})")
    p.add_argument("--no-ragged", action="store_true", help="skip the batch of prompts of different lengths")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--tag", default="", help="suffix for the results file name, e.g. 'b1-256'")
    add_output_args(p)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run(quick=args.quick, new_tokens=args.new_tokens, batch_sizes=args.batch_sizes, preset=args.preset,
               ragged=not args.no_ragged, no_cache_max_batch=max(args.batch_sizes))
    print(format_table(rows, ["case", "impl", "dtype", "new_tokens", "seconds", "tokens_per_s", "ms_per_step",
                              "speedup", "threads"]))
    print(f"saved {save_results('generate' + (f'-{args.tag}' if args.tag else ''), rows, out_dir=results_dir(args))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
