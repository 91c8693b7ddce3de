"""The skinny-GEMM kernel (kernels/skinny_linear.py) against its torch reference: interpreted on
the CPU (CI), compiled on a CUDA device when run with TRITON_INTERPRET=0 on a machine that has one.
Odd sizes (N and K not multiples of the blocks, M from 1 to the kernel's limit), each fusion the
model uses, a strided input (the q columns of a stacked q/k/v output)."""

from __future__ import annotations

import pytest
import torch

import kernels.skinny_linear as skinny_module
from kernels._backend import interpreting
from kernels.skinny_linear import (
    SKINNY_MAX_M,
    skinny_linear,
    skinny_linear_op,
    skinny_linear_reference,
    skinny_qkv,
    skinny_qkv_reference,
)
from tests.kernels.triton_device import DEVICE, DTYPES

TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}  # of the output's largest value
DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
SHAPES = {"m1-n63-k111": (1, 63, 111), "m7-n300-k64": (7, 300, 64), "m16-n17-k200": (16, 17, 200),
          "m33-n40-k96": (33, 40, 96), f"m{SKINNY_MAX_M}-n24-k48": (SKINNY_MAX_M, 24, 48)}
FUSIONS = {"plain": (False, False, False), "norm": (True, False, False), "norm+residual": (True, False, True),
           "silu+residual": (False, True, True), "norm+silu": (True, True, False)}


def _case(m: int, n: int, k: int, fusion: str, dtype: torch.dtype, seed: int = 0):  # noqa: ANN202
    norm, silu, residual = FUSIONS[fusion]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, 2 * k if silu else k, generator=gen)
    w = torch.randn(n, k, generator=gen) / k**0.5
    g = torch.rand(k, generator=gen) + 0.5 if norm else None
    r = torch.randn(m, n, generator=gen) if residual else None
    return [None if t is None else t.to(DEVICE, dtype) for t in (x, w, g, r)], silu


def _check(got: torch.Tensor, x, w, g, r, silu: bool, dtype: torch.dtype) -> None:  # noqa: ANN001
    ref = skinny_linear_reference(x.double(), w.double(), None if g is None else g.double(), 1e-6, silu,
                                  None if r is None else r.double())
    assert got.dtype == dtype and got.shape == ref.shape
    assert torch.isfinite(got).all()
    err = float((got.float() - ref).abs().max() / ref.abs().max())
    assert err < TOL[dtype], f"relative error {err:.2e}"


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("fusion", list(FUSIONS))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_skinny_linear(shape: str, fusion: str, dtype: torch.dtype) -> None:
    (x, w, g, r), silu = _case(*SHAPES[shape], fusion, dtype)
    _check(skinny_linear(x, w, g, 1e-6, silu, r, backend="triton"), x, w, g, r, silu, dtype)


def test_split_k_sums_in_order_and_leaves_its_counters_zeroed(monkeypatch: pytest.MonkeyPatch) -> None:
    """K cut into many slices (the last to finish sums them): twice the same bits, counters reset
    for the next launch (a CUDA graph replays without clearing them)."""
    for key in ("SKINNY_CONFIG_INTERPRETED", "SKINNY_CONFIG"):
        monkeypatch.setattr(skinny_module, key, (16, 32, 64, 1, 1) if interpreting() else (32, 64, 1024, 4, 2))
    (x, w, g, r), silu = _case(7, 50, 300, "norm+residual", torch.float32)
    first = skinny_linear(x, w, g, 1e-6, silu, r, backend="triton")
    _check(first, x, w, g, r, silu, torch.float32)
    assert int(skinny_module._counters(x.device).abs().sum()) == 0
    torch.testing.assert_close(skinny_linear(x, w, g, 1e-6, silu, r, backend="triton"), first, atol=0, rtol=0)


@pytest.mark.skipif(DEVICE != "cuda", reason="the L2 prefetch is inline PTX: compiled only")
@pytest.mark.parametrize("fusion", ["norm", "silu+residual"])
def test_skinny_linear_with_l2_prefetch(fusion: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(skinny_module, "PREFETCH_L2", True)
    (x, w, g, r), silu = _case(7, 3000, 1000, fusion, torch.bfloat16)
    _check(skinny_linear(x, w, g, 1e-6, silu, r, backend="triton"), x, w, g, r, silu, torch.bfloat16)


@pytest.mark.skipif(DEVICE != "cuda", reason="the L2 prefetch is inline PTX: compiled only")
@pytest.mark.parametrize("tiles", [1, 2])
def test_skinny_linear_with_l2_prefetch_after_the_wait(tiles: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(skinny_module, "POST_WAIT_PREFETCH", tiles)
    monkeypatch.setattr(skinny_module, "POST_WAIT_ORDER", "x_together")
    for fusion in ("norm", "silu+residual"):
        (x, w, g, r), silu = _case(7, 3000, 1000, fusion, torch.bfloat16)
        _check(skinny_linear(x, w, g, 1e-6, silu, r, backend="triton"), x, w, g, r, silu, torch.bfloat16)


@pytest.mark.parametrize("order", ["in_turn", "x_together"])
@pytest.mark.parametrize("pre_wait", [1, 2, 3])
@pytest.mark.parametrize("shape", ["m1-n63-k111", "m7-n300-k64", "m16-n17-k200"])
def test_skinny_linear_with_tiles_loaded_before_the_wait(shape: str, pre_wait: int, order: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """One, two or three weight tiles per program before the PDL wait (PRE_WAIT_TILES; three by
    default), slices of one, two or many tiles (the tiles past a slice's end contribute nothing),
    each fusion's tiles; their x tiles loaded in turn or together after the wait (POST_WAIT_ORDER)."""
    monkeypatch.setattr(skinny_module, "PRE_WAIT_TILES", pre_wait)
    monkeypatch.setattr(skinny_module, "POST_WAIT_ORDER", order)
    for fusion in ("norm+residual", "silu+residual"):
        (x, w, g, r), silu = _case(*SHAPES[shape], fusion, torch.float32)
        _check(skinny_linear(x, w, g, 1e-6, silu, r, backend="triton"), x, w, g, r, silu, torch.float32)


def test_skinny_linear_reads_a_strided_input_in_place() -> None:
    (qkv, w, g, r), _ = _case(5, 48, 120, "norm+residual", torch.float32)
    x = qkv[:, :40]  # the first 40 columns: rows 120 apart
    w = w[:, :40].contiguous()
    _check(skinny_linear(x, w, g[:40], 1e-6, False, r, backend="triton"), x, w, g[:40], r, False, torch.float32)


def test_skinny_linear_op_is_the_kernel() -> None:
    (x, w, g, r), silu = _case(7, 40, 64, "silu+residual", torch.float32)
    got = skinny_linear_op(x, w, g, 1e-6, silu, r)
    torch.testing.assert_close(got, skinny_linear(x, w, g, 1e-6, silu, r, backend="triton"), atol=0, rtol=0)
    _check(got, x, w, g, r, silu, torch.float32)


def test_skinny_linear_rejects_bad_input() -> None:
    (x, w, g, r), _ = _case(4, 32, 64, "norm+residual", torch.float32)
    with pytest.raises(ValueError, match=r"must be \[M, K\]"):
        skinny_linear(x[:, :63], w, backend="triton")
    with pytest.raises(ValueError, match="must be \\[M, 2K\\]"):
        skinny_linear(x, w, silu=True, backend="triton")
    with pytest.raises(ValueError, match="norm_weight"):
        skinny_linear(x, w, g[:10], backend="triton")
    with pytest.raises(ValueError, match="residual"):
        skinny_linear(x, w, residual=r[:, :5], backend="triton")
    with pytest.raises(TypeError, match="dtype"):
        skinny_linear(x, w.half(), backend="triton")
    with pytest.raises(TypeError, match="must be one of"):
        skinny_linear(x.long(), w.long(), backend="triton")
    big = torch.zeros(SKINNY_MAX_M + 1, 64, device=DEVICE)
    with pytest.raises(ValueError, match=f"M <= {SKINNY_MAX_M}"):
        skinny_linear(big, w, backend="triton")
    assert skinny_linear(big, w, backend="torch").shape == (SKINNY_MAX_M + 1, 32)  # the reference has no limit


QKV_SHAPES = {"m1-h4x2-d16": (1, 4, 2, 16, 40), "m7-h2x1-d32": (7, 2, 1, 32, 70), "m16-h8x2-d16": (16, 8, 2, 16, 33)}


def _rope(m: int, d: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    pos = torch.randint(0, 130_000, (m,), generator=gen)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(d // 2).float() / (d // 2)))
    angles = pos.float()[:, None] * inv_freq
    return angles.cos().to(DEVICE), angles.sin().to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("shape", list(QKV_SHAPES))
def test_skinny_qkv_rotates_and_writes_the_rings(shape: str, dtype: torch.dtype) -> None:
    """The self layer's fused q/k/v: the projection of rmsnorm(x), q and k rotated, k and v in
    their ring rows - and no other ring row touched (poisoned with NaN)."""
    m, hq, hkv, d, k = QKV_SHAPES[shape]
    gen = torch.Generator().manual_seed(m)
    x = torch.randn(m, k, generator=gen).to(DEVICE, dtype)
    w = (torch.randn((hq + 2 * hkv) * d, k, generator=gen) / k**0.5).to(DEVICE, dtype)
    g = (torch.rand(k, generator=gen) + 0.5).to(DEVICE, dtype)
    cos, sin = _rope(m, d, gen)
    slots_n, window = m + 3, 8
    slots = torch.randperm(slots_n, generator=gen)[:m].to(DEVICE)
    rows = torch.randint(0, window, (m,), generator=gen).to(DEVICE)
    ring_k, ring_v = (torch.full((slots_n, window, hkv, d), float("nan"), device=DEVICE, dtype=dtype) for _ in "kv")
    ref_k, ref_v = (torch.full((slots_n, window, hkv, d), float("nan"), device=DEVICE, dtype=torch.float64)
                    for _ in "kv")
    got = skinny_qkv(x, w, g, 1e-6, cos, sin, hq, hkv, ring_k, ring_v, slots, rows, backend="triton")
    ref = skinny_qkv_reference(x.double(), w.double(), g.double(), 1e-6, cos.double(), sin.double(), hq, hkv,
                               ref_k, ref_v, slots, rows)
    scale = float(ref.abs().max())
    assert got.dtype == dtype and float((got.double() - ref).abs().max()) / scale < TOL[dtype]
    for ring, expected in ((ring_k, ref_k), (ring_v, ref_v)):
        written = ~torch.isnan(expected)
        assert torch.equal(~torch.isnan(ring), written)  # those rows, and only those
        assert float((ring.double()[written] - expected[written]).abs().max()) / scale < TOL[dtype]


def test_skinny_qkv_rejects_bad_input() -> None:
    m, hq, hkv, d, k = QKV_SHAPES["m7-h2x1-d32"]
    x, w = torch.zeros(m, k, device=DEVICE), torch.zeros((hq + 2 * hkv) * d, k, device=DEVICE)
    cos = sin = torch.zeros(m, d // 2, device=DEVICE)
    ring = torch.zeros(4, 8, hkv, d, device=DEVICE)
    idx = torch.zeros(m, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="cos"):
        skinny_qkv(x, w, None, 1e-6, cos[:, :3], sin[:, :3], hq, hkv, ring, ring.clone(), idx, idx, backend="triton")
    with pytest.raises(ValueError, match="must be \\[\\(Hq \\+ 2 Hkv\\) d"):
        skinny_qkv(x, w[:-1], None, 1e-6, cos, sin, hq, hkv, ring, ring.clone(), idx, idx, backend="triton")
    with pytest.raises(ValueError, match="rings"):
        skinny_qkv(x, w, None, 1e-6, cos, sin, hq, hkv, ring, ring[:, :4], idx, idx, backend="triton")
    with pytest.raises(TypeError, match="slots"):
        skinny_qkv(x, w, None, 1e-6, cos, sin, hq, hkv, ring, ring.clone(), idx.int(), idx, backend="triton")
    with pytest.raises(ValueError, match="contiguous"):
        strided = torch.zeros(4, 8, d, hkv, device=DEVICE).transpose(2, 3)
        skinny_qkv(x, w, None, 1e-6, cos, sin, hq, hkv, strided, strided, idx, idx, backend="triton")


@pytest.mark.skipif(DEVICE != "cuda", reason="PDL chains and CUDA graphs run only on the card")
def test_ring_attention_after_the_fused_qkv_reads_the_token_just_written(tmp_path) -> None:  # noqa: ANN001
    """clsa-4b's 16 self layers of skinny_qkv -> ring attention in one CUDA graph, each replay a
    new ring row (bench/ring_race.py): the attention, reading the token's own row after its PDL wait
    (the rest before it, as the decode step has it do) or the whole ring after it, matches a lone
    recomputation bit for bit in every layer of every replay."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, str(root / "bench" / "ring_race.py"), "--bs", "7", "1", "--replays", "20",
                           "--check", "--out", str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=root)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
