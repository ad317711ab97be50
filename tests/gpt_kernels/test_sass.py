"""What the kernels compile to, checked in the machine code (SASS) of every config for sm_80 and sm_90.

No GPU needed: the ``compile_report`` fixture (tests/gpt_kernels/conftest.py) builds every case of the
compile check once per session and reads its SASS with the ``cuobjdump`` in Triton's wheel
(``gpt_kernels.compile_check.sass_stats``). These are the properties issue 13 found to decide speed:

- attention's matrix products run on Hopper's warpgroup MMA (HGMMA), none of them 16 wide in N (an
  HGMMA.64x16x16 issues a quarter of the work of a 64x64x16 for the same overhead);
- the memory-bound kernels move 16 bytes per thread per load and store (``LDG.E.128``/``STG.E.128``);
- attention with dropout costs at most 1.6x the instructions of the same config without it.

No spills: tests/gpt_kernels/test_compile.py. ``python -m gpt_kernels.report`` prints all of it as a table.
"""

import re

import pytest

ATTENTION_MMA_KERNELS = ("_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq", "_attn_fwd_splitk")
MEMORY_BOUND_KERNELS = ("_layer_norm_fwd_kernel", "_layer_norm_bwd_kernel", "_gelu_fwd_kernel", "_gelu_bwd_kernel",
                        "_bias_gelu_fwd_kernel", "_bias_gelu_bwd_kernel")


def _mma_rows(compile_report, arch):
    rows = [r for k in ATTENTION_MMA_KERNELS for r in compile_report.rows(kernel=k, arch=arch)]
    assert rows, "no attention configs in the compile report"
    return rows


def _row_tile(r) -> int:
    """The tile side that is the M of the kernel's matrix products: query rows for the forward and dQ
    kernels, keys for dK/dV (it computes the transposed scores k q^T; its atomic-dQ product, dQ^T = k^T
    dS^T, has the head dim as M)."""
    c = r["constexprs"]
    return int(c["BLOCK_N"]) if r["kernel"] == "_attn_bwd_dkdv" else int(c["BLOCK_M"])


def _hgmma_n(key: str) -> int:
    return int(re.match(r"HGMMA\.(\d+)x(\d+)x(\d+)", key).group(2))


def test_bf16_attention_runs_on_wide_hgmma_on_sm90(compile_report):
    """Every bf16 attention config whose products are at least 64 rows (a warpgroup's M) uses HGMMA for
    all of them, and none with N = 16. Decoding tiles (16 query rows) are below wgmma's M of 64 and run
    on mma.sync (HMMA) by design: for those only the N = 16 rule applies."""
    checked = 0
    for r in _mma_rows(compile_report, "sm_90"):
        if "bf16" not in r["label"] or r["error"]:
            continue
        narrow = [k for k in r["mma"] if k.startswith("HGMMA") and _hgmma_n(k) == 16]
        assert not narrow, f"{r['name']}: HGMMA with N = 16: {r['mma']}"
        if _row_tile(r) >= 64:
            assert any(k.startswith("HGMMA") for k in r["mma"]), f"{r['name']} uses no HGMMA: {r['mma']}"
            assert not any(k.startswith("HMMA") for k in r["mma"]), f"{r['name']} falls back to HMMA: {r['mma']}"
            checked += 1
    assert checked >= 10, f"only {checked} bf16 attention configs checked"


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_memory_bound_kernels_move_16_bytes_per_thread(compile_report, arch):
    """LayerNorm, add+LayerNorm, GELU and bias+GELU at GPT-2's widths (768, 1024, 1280, 1600 and 4x those):
    the widest global load and store of every config is 128 bits."""
    for kernel in MEMORY_BOUND_KERNELS:
        rows = compile_report.rows(kernel=kernel, arch=arch)
        assert rows, f"no {kernel} configs"
        for r in rows:
            assert r["error"] is None, f"{r['name']}: {r['error']}"
            assert r["ldg_bits"] == 128 and r["stg_bits"] == 128, (
                f"{r['name']} on {arch}: widest load {r['ldg_bits']} bits, store {r['stg_bits']} bits "
                f"(loads: {r['loads']})")


def test_layer_norm_and_gelu_cover_gpt2_widths(compile_report):
    """The configs above are the ones the launchers pick at every GPT-2 width: each width is named in a
    LayerNorm forward and backward label (the labels list the widths sharing a config)."""
    for kernel in ("_layer_norm_fwd_kernel", "_layer_norm_bwd_kernel"):
        labels = " ".join(r["label"] for r in compile_report.rows(kernel=kernel, arch="sm_90"))
        for n in (768, 1024, 1280, 1600, 3072, 4096, 5120, 6400):
            assert re.search(rf"\b{n}\b", labels), f"{kernel}: width {n} not compiled"


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_attention_forward_dropout_costs_under_1_6x(compile_report, arch):
    """For every forward config compiled both with and without dropout (same tile, head dim, dtype), the
    SASS with dropout has at most 1.6x the instructions (Philox: 16 keep-decisions per call)."""
    rows = compile_report.rows(kernel="_attn_fwd", arch=arch)
    plain = {(r["label"], r["num_warps"], r["num_stages"], r["constexprs"]["BLOCK_M"], r["constexprs"]["BLOCK_N"]): r
             for r in rows if not r["error"] and "dropout" not in r["label"]}
    pairs = 0
    for r in rows:
        if r["error"] or "dropout" not in r["label"]:
            continue
        key = (r["label"].replace(" dropout", ""), r["num_warps"], r["num_stages"], r["constexprs"]["BLOCK_M"],
               r["constexprs"]["BLOCK_N"])
        if key not in plain:
            continue
        ratio = r["instructions"] / plain[key]["instructions"]
        assert ratio <= 1.6, (f"{r['name']} on {arch}: {r['instructions']} SASS instructions with dropout, "
                              f"{plain[key]['instructions']} without: {ratio:.2f}x")
        pairs += 1
    assert pairs >= 4, f"only {pairs} forward configs compiled both with and without dropout"


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_cross_entropy_on_the_models_path_moves_16_bytes_per_thread(compile_report, arch):
    """The model's training loss (linear_cross_entropy: the fused pass over each chunk of its padded head's
    logits, rows 50,304 apart) loads and stores every logit 128 bits per thread: the chunk loop's body is
    unmasked and its masked tail ends at the padded width. What loads narrower is per row, not per logit:
    the target id, the target's logit and the row's gradient factor. The evaluation path's forward over the
    padded logits' view loads its unmasked chunks 128 bits wide as well."""
    fused = compile_report.rows(kernel="_cross_entropy_kernel", arch=arch, label="fused")
    fused = [r for r in fused if "rows=50304" in r["label"]]
    assert len(fused) >= 4, "the padded fused cases are missing from the compile check"
    for r in fused:
        assert r["error"] is None, f"{r['name']}: {r['error']}"
        assert r["ldg_bits"] == 128 and r["stg_bits"] == 128, f"{r['name']} on {arch}: {r['loads']}"
        narrow = sum(n for op, n in r["loads"].items() if not op.endswith(".128"))
        assert narrow <= 3, f"{r['name']} on {arch}: {narrow} loads narrower than 128 bits: {r['loads']}"
    fwds = compile_report.rows(kernel="_cross_entropy_kernel", arch=arch, label="fwd rows=50304")
    assert {r["label"] for r in fwds} == {"V=50257 bf16 fwd rows=50304", "V=50257 fp32 fwd rows=50304"}
    for fwd in fwds:  # the evaluation path's forward (bf16 autocast and float32)
        assert fwd["ldg_bits"] == 128, f"{fwd['name']} on {arch}: {fwd['loads']}"
