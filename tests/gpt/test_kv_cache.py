"""The KV cache, batched prompts of different lengths, streaming, and ``gpt generate``'s new options.

Exactness tests run in float32 on a tiny model with a small vocabulary (wide gaps between the top logits,
so float rounding cannot flip a greedy choice) and a short context, so the window slides within a few steps.
"""

import pytest
import torch

import gpt_kernels
from gpt import GPT
from gpt.cli import main
from gpt.generate import decode_stream, generate, generate_stream
from gpt.kv_cache import KVCache
from gpt.tokenizer import decode, encode

CTX = 16


@pytest.fixture(autouse=True)
def _one_thread():
    """Thousands of tiny ops: one CPU thread beats waking a second, and a busy machine cannot stall it."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT.from_preset("tiny", dropout=0.0, vocab_size=320, context_length=CTX).eval()


def prompt(*shape, vocab=320):
    return torch.randint(0, vocab, shape)


# ----------------------------------------------------------------------------------------- the cache itself


def test_cache_is_preallocated_per_layer_in_the_models_dtype(model):
    cache = model.new_kv_cache(3)
    cfg = model.config
    assert len(cache.layers) == cfg.n_layers and cache.length == 0
    for layer in cache.layers:
        assert layer.k.shape == layer.v.shape == (3, cfg.n_heads, CTX, cfg.head_dim)
        assert layer.k.dtype == torch.float32
    half = GPT.from_preset("tiny", dropout=0.0, vocab_size=320, context_length=CTX).to(torch.bfloat16)
    assert half.new_kv_cache(1).layers[0].v.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="max_len"):
        model.new_kv_cache(1, max_len=CTX + 1)


@pytest.mark.parametrize("B, T, chunks", [(1, 9, [9]), (2, 11, [4, 1, 1, 5]), (3, CTX, [1] * CTX)])
def test_prefill_and_steps_give_the_full_forwards_logits(model, B, T, chunks):
    idx = prompt(B, T)
    with torch.no_grad():
        full = model(idx)  # (B, T, V)
        cache, got, at = model.new_kv_cache(B), [], 0
        for n in chunks:  # a prefill of several tokens after cached ones: Tq < Tk, causal aligned to the end
            got.append(model(idx[:, at:at + n], cache=cache))
            at += n
        assert cache.length == T
    torch.testing.assert_close(torch.cat(got, 1), full, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="KV cache holds 16 tokens"):
        model(prompt(B, CTX - T + 1), cache=cache)  # one token more than is left
    assert KVCache.for_model(model, B, max_len=4).layers[0].k.shape[2] == 4


def test_left_padded_rows_match_each_row_alone(model):
    lengths = [7, 2, 5]
    rows = [prompt(n) for n in lengths]
    P = max(lengths)
    idx = torch.zeros(3, P, dtype=torch.long)
    for b, r in enumerate(rows):
        idx[b, P - len(r):] = r
    cache = model.new_kv_cache(3)
    cache.reset(pad=torch.tensor([P - n for n in lengths]))
    with torch.no_grad():
        first = model(idx, cache=cache)  # (3, P, V)
        step = model(prompt(3, 1), cache=cache)  # (3, 1, V), one more token per row
        for b, r in enumerate(rows):
            alone = model(r[None])  # (1, n, V)
            torch.testing.assert_close(first[b, P - len(r):], alone[0], rtol=1e-5, atol=1e-5)
    assert torch.isfinite(first).all() and torch.isfinite(step).all()  # padding queries never see only -inf


def test_unpadded_rows_take_the_kernel_path_and_padded_rows_the_masked_one(model, monkeypatch):
    """Rows that all start at slot 0 need no mask: gpt_kernels.attention's end-aligned causal attention runs
    (the fused kernel on a GPU); left-padded rows need the padding masked, which only the SDPA call with a
    mask expresses. Both give the same answer on unpadded rows (a mask of only the causal part), so this
    watches which one ran."""
    calls = []
    real = gpt_kernels.attention
    monkeypatch.setattr(gpt_kernels, "attention", lambda *a, **k: calls.append(a[2].shape[2]) or real(*a, **k))
    n_layers = model.config.n_layers
    cache = model.new_kv_cache(2)
    cache.reset(pad=torch.tensor([0, 0]))  # no padding anywhere: the plain path
    with torch.no_grad():
        model(prompt(2, 4), cache=cache)
        model(prompt(2, 1), cache=cache)
    assert calls == [4] * n_layers + [5] * n_layers  # prefill, then one step seeing the 5 cached keys
    calls.clear()
    cache.reset(pad=torch.tensor([0, 2]))
    with torch.no_grad():
        model(prompt(2, 4), cache=cache)
    assert calls == []


def test_last_only_and_plain_forward_are_unchanged(model):
    idx = prompt(2, 6)
    with torch.no_grad():
        torch.testing.assert_close(model(idx, last_only=True), model(idx)[:, -1:], rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="last_only"):
        model(idx, idx, last_only=True)
    with pytest.raises(ValueError, match="made for 3 rows"):
        model(idx, cache=model.new_kv_cache(3))


# ------------------------------------------------------------------------- generation: cache == no cache


@pytest.mark.parametrize("B, T, n", [(1, 1, 8), (2, 5, 8), (1, 9, 20), (3, CTX, 12), (2, 3, 3 * CTX)])
def test_greedy_tokens_are_the_same_with_and_without_cache(model, B, T, n):
    idx = prompt(B, T)  # several cases grow past the 16-token context: the window slides
    cached = generate(model, idx, n)
    plain = generate(model, idx, n, use_cache=False)
    assert cached.shape == (B, T + n)
    assert torch.equal(cached, plain)


def test_seeded_sampling_is_the_same_with_and_without_cache(model):
    idx = prompt(2, 4)
    kw = dict(temperature=1.0, top_k=50, top_p=0.95, seed=7)
    assert torch.equal(generate(model, idx, 2 * CTX, **kw), generate(model, idx, 2 * CTX, use_cache=False, **kw))


def test_the_cached_path_feeds_one_token_per_step_until_the_context_is_full(model):
    fed = []
    hook = model.register_forward_pre_hook(lambda m, args, kwargs: fed.append(args[0].shape[1]), with_kwargs=True)
    try:
        generate(model, prompt(2, 5), 15)  # 5 + 15 = 20 tokens: tokens 18, 19 and 20 see a slid window
    finally:
        hook.remove()
    assert fed == [5] + [1] * 11 + [CTX] * 3  # prefill, 11 one-token steps, then a full window each step


def test_past_the_context_the_cached_path_recomputes_the_window(model):
    """Slide and recompute: each step past the context prefills the last CTX tokens at positions 0..CTX-1."""
    idx = prompt(1, CTX - 2)
    out = generate(model, idx, 6)
    seq = idx
    with torch.no_grad():
        for _ in range(6):
            seq = torch.cat([seq, model(seq[:, -CTX:])[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq)


# ------------------------------------------------------------------------------ batches of any lengths


def test_batched_prompts_of_different_lengths_equal_each_prompt_alone(model):
    rows = [prompt(n).tolist() for n in (1, 6, CTX, 3)]
    n = CTX + 4  # past the context for every row
    alone = [generate(model, r, n).tolist() for r in rows]
    assert generate(model, rows, n) == alone
    assert generate(model, rows, n, use_cache=False) == alone
    assert [len(r) for r in alone] == [len(r) + n for r in rows]


def test_each_row_stops_at_its_own_eos(model):
    rows = [prompt(n).tolist() for n in (4, 9, 2)]
    alone = [generate(model, r, 12).tolist() for r in rows]
    eos = alone[1][9 + 3]  # the 4th token row 1 makes; other rows stop there or run on
    want = []
    for r, full in zip(rows, alone):
        new = full[len(r):]
        want.append(r + (new[:new.index(eos) + 1] if eos in new else new))
    for use_cache in (True, False):
        got = generate(model, rows, 12, eos_id=eos, use_cache=use_cache)
        assert got == want
        assert got[1][-1] == eos and len(got[1]) <= 9 + 4
    # a (B, T) tensor keeps its shape: a finished row is padded with eos while the others go on
    t = generate(model, torch.tensor([rows[1], prompt(9).tolist()]), 12, eos_id=eos)
    stop = 9 + t[0, 9:].tolist().index(eos)
    assert stop <= 9 + 3 and (t[0, stop:] == eos).all()
    assert torch.equal(t[0, :stop + 1], torch.tensor(want[1]))


def test_stream_yields_the_same_tokens_as_generate(model):
    idx = prompt(7)
    n = CTX + 3
    stream = list(generate_stream(model, idx, n))
    assert all(isinstance(t, int) for t in stream)
    assert stream == generate(model, idx, n)[7:].tolist()
    rows = [prompt(3).tolist(), prompt(5).tolist()]
    steps = list(generate_stream(model, rows, 4, use_cache=False))
    assert len(steps) == 4 and all(isinstance(s, list) and len(s) == 2 for s in steps)
    assert [r + [s[b] for s in steps] for b, r in enumerate(rows)] == generate(model, rows, 4)


def test_generation_restores_training_mode(model):
    m = GPT.from_preset("tiny", vocab_size=320, context_length=CTX)  # dropout on, training mode
    a = generate(m, [1, 2, 3], 5)
    assert m.training and torch.equal(a, generate(m, [1, 2, 3], 5, use_cache=False))


# -------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("idx, kwargs, match", [
    ([[1, 2], []], {}, "prompt 1 of the batch is empty"),
    ([[1, 2], [3]], dict(max_new_tokens=-1), "max_new_tokens"),
    ([[1, 2], [3]], dict(temperature=-1.0), "temperature"),
    ([[1, 2], [3]], dict(top_k=0), "top_k"),
    ([[1, 2], [3]], dict(top_p=0.0), "top_p"),
    ([[1, 2], [3]], dict(top_p=1.01), "top_p"),
    ([[1], list(range(CTX + 1))], {}, "prompt 1 of the batch has 17 tokens"),
    (torch.zeros(2, 0, dtype=torch.long), {}, "non-empty"),
    ([], {}, "non-empty"),
])
@pytest.mark.parametrize("use_cache", [True, False])
def test_bad_input_is_a_clear_error(model, idx, kwargs, match, use_cache):
    kwargs = {"max_new_tokens": 3, **kwargs}
    with pytest.raises(ValueError, match=match):
        generate(model, idx, use_cache=use_cache, **kwargs)
    with pytest.raises(ValueError, match=match):
        generate_stream(model, idx, use_cache=use_cache, **kwargs)  # at the call, not at the first token


# -------------------------------------------------------------------------------- text and the command


def test_decode_stream_holds_back_split_utf8_characters():
    text = "naïve 🙂 and 東京 🤖"
    ids = encode(text)
    pieces = list(decode_stream(ids))
    assert "".join(pieces) == decode(ids) == text
    assert "\ufffd" not in "".join(pieces)
    assert len(pieces) < len(ids)  # some tokens held only part of a character: nothing printed for them


def test_cli_streams_and_reports_tokens_per_second(tmp_path, capsys):
    from gpt import save_checkpoint

    torch.manual_seed(0)
    save_checkpoint(GPT.from_preset("tiny", dropout=0.0), tmp_path / "ck")
    base = ["generate", "--prompt", "Every effort moves you", "--checkpoint", str(tmp_path / "ck"),
            "--max-new-tokens", "12", "--temperature", "0", "--device", "cpu", "--no-stop-at-eos"]
    outs = []
    for extra in ([], ["--no-cache"]):
        assert main(base + extra) == 0
        out, err = capsys.readouterr()
        assert out.startswith("Every effort moves you") and "tokens/s" in err
        assert ("KV cache off" in err) == bool(extra)
        outs.append(out)
    assert outs[0] == outs[1]  # greedy: the same text with and without the cache
    assert main(base + ["--dtype", "bfloat16", "--max-new-tokens", "3"]) == 0
    assert "bfloat16" in capsys.readouterr().err
