"""End to end on the CPU: is our model (PyTorch path) as fast as Hugging Face's GPT-2 on the same weights?

Both models get the same randomly initialised GPT-2 weights (ours loaded from the ``save_pretrained``
directory of theirs) and the same token ids. Measured, median of repeats after a warm-up:

- training: steps/s of forward + backward + AdamW step, batch ``B`` x ``T`` tokens, dropout as configured;
- generation: new tokens/s, greedy, one prompt, each library's own KV cache.

    python -m bench e2e_cpu            # gpt2-small and tiny
"""

from __future__ import annotations

import tempfile

import torch

from bench.common import add_output_args, cpu_time_ms, format_table, results_dir, save_results

METRIC = "vs_transformers"  # the figure plotted: our speed over transformers' in the same run (1 = equal)


def _models(preset: str):
    import transformers

    from gpt import load_hf
    from gpt.config import GPTConfig

    cfg = GPTConfig.from_preset(preset)
    hf_cfg = transformers.GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.context_length, n_embd=cfg.emb_dim,
                                     n_layer=cfg.n_layers, n_head=cfg.n_heads)
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(hf_cfg)
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = load_hf(d)
    return ours, hf


def _train_step_fn(model, idx, is_hf: bool):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    model.train()

    def step():
        if is_hf:
            loss = model(idx[:, :-1], labels=idx[:, :-1]).loss  # T tokens, shifted inside
        else:
            _, loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _generate_fn(model, prompt, new_tokens: int, is_hf: bool):
    from gpt import generate

    model.eval()

    def gen():
        with torch.no_grad():
            if is_hf:
                model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                               use_cache=True, pad_token_id=50256)
            else:
                generate(model, prompt, new_tokens)

    return gen


def run(quick: bool = False) -> list[dict]:
    rows = []
    presets = ["tiny"] if quick else ["tiny", "gpt2-small"]
    for preset in presets:
        ours, hf = _models(preset)
        B, T = (2, 64) if preset == "tiny" else (2, 128)
        new_tokens = 16 if quick else 32
        reps = 3 if quick else 5
        idx = torch.randint(0, 50257, (B, T + 1))
        prompt = torch.randint(0, 50257, (1, 16))
        for impl, model, is_hf in (("ours", ours, False), ("transformers", hf, True)):
            ms = cpu_time_ms(_train_step_fn(model, idx, is_hf), repeats=reps, warmup=1)
            rows.append({"suite": "e2e_cpu", "case": f"{preset} train B{B}xT{T}", "impl": impl, "ms": ms,
                         "per_s": 1e3 / ms, "unit": "steps/s"})
            ms = cpu_time_ms(_generate_fn(model, prompt, new_tokens, is_hf), repeats=reps, warmup=1)
            rows.append({"suite": "e2e_cpu", "case": f"{preset} generate {new_tokens} tok", "impl": impl,
                         "ms": ms, "per_s": new_tokens * 1e3 / ms, "unit": "tokens/s"})
    for r in rows:  # ratio against transformers in the same run
        base = next(b for b in rows if b["case"] == r["case"] and b["impl"] == "transformers")
        r["vs_transformers"] = r["per_s"] / base["per_s"]
    return rows


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny preset only, fewer repeats")
    add_output_args(p)
    args = p.parse_args(argv)
    torch.set_num_threads(torch.get_num_threads())
    rows = run(quick=args.quick)
    print(format_table(rows, ["case", "impl", "ms", "per_s", "unit", "vs_transformers"]))
    print(f"saved {save_results('e2e_cpu', rows, out_dir=results_dir(args))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
