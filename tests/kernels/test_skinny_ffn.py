"""The one-kernel decode FFN (kernels/skinny_ffn.py) against its torch reference: interpreted on the
CPU (CI), compiled on a CUDA device when run with TRITON_INTERPRET=0 on a machine that has one.
Odd model widths, 1 to SKINNY_MAX_M rows, hidden sizes cut into one or several slices, the
counters left zero for the next launch, launches back to back on one weight, and the shapes the
kernel hands to the two-launch path."""

from __future__ import annotations

import pytest
import torch

import kernels.skinny_ffn as ffn_module
from kernels.skinny_ffn import (
    counters,
    launch_plan,
    skinny_ffn,
    skinny_ffn_op,
    skinny_ffn_reference,
    skinny_finish,
    skinny_finish_reference,
)
from kernels.skinny_linear import SKINNY_MAX_M
from tests.kernels.triton_device import DEVICE, DTYPES

TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}  # of the output's largest value
DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
# (M, D, F): F = 64 is one slice of the interpreted configuration, 256 four; D = 100 and 33 are not
# multiples of the blocks.
SHAPES = {"m1-d48-f128": (1, 48, 128), "m7-d100-f256": (7, 100, 256), "m16-d64-f192": (16, 64, 192),
          "m5-d33-f64": (5, 33, 64), f"m{SKINNY_MAX_M}-d40-f128": (SKINNY_MAX_M, 40, 128)}
if DEVICE == "cuda":  # clsa-4b's FFN in its own configuration
    SHAPES["m7-d3072-f8192"] = (7, 3072, 8192)


def _case(m: int, d: int, f: int, dtype: torch.dtype, seed: int = 0):  # noqa: ANN202
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, d, generator=gen)
    w_gate_up = torch.randn(2 * f, d, generator=gen) / d**0.5
    w_down = torch.randn(d, f, generator=gen) / f**0.5
    g = torch.rand(d, generator=gen) + 0.5
    r = torch.randn(m, d, generator=gen)
    return [t.to(DEVICE, dtype) for t in (x, w_gate_up, w_down, g, r)]


def _check(got: torch.Tensor, x, w_gate_up, w_down, g, r, dtype: torch.dtype) -> None:  # noqa: ANN001
    ref = skinny_ffn_reference(*(t.double() for t in (x, w_gate_up, w_down, g)), 1e-6, r.double())
    assert got.dtype == dtype and got.shape == ref.shape
    assert torch.isfinite(got).all()
    err = float((got.double() - ref).abs().max() / ref.abs().max())
    assert err < TOL[dtype], f"relative error {err:.2e}"


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_skinny_ffn(shape: str, dtype: torch.dtype) -> None:
    m, d, f = SHAPES[shape]
    assert launch_plan(m, d, f) is not None  # the one-kernel path, not the fallback
    x, wgu, wd, g, r = _case(m, d, f, dtype)
    _check(skinny_ffn(x, wgu, wd, g, 1e-6, r, backend="triton"), x, wgu, wd, g, r, dtype)


@pytest.mark.parametrize("pre_wait", [1, 2])
def test_skinny_ffn_with_tiles_loaded_before_the_wait(pre_wait: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ffn_module, "FFN_PRE_WAIT_TILES", pre_wait)
    x, wgu, wd, g, r = _case(7, 100, 256, torch.float32)
    _check(skinny_ffn(x, wgu, wd, g, 1e-6, r, backend="triton"), x, wgu, wd, g, r, torch.float32)


def test_skinny_ffn_leaves_its_counters_zeroed_and_repeats_bit_for_bit() -> None:
    """Launches back to back on one weight (a CUDA graph replays without clearing the counters; with
    PDL the second takes its tiles while the first may still run): the same bits every time, and
    the counters zero after each."""
    x, wgu, wd, g, r = _case(7, 100, 256, torch.float32)
    outs = [skinny_ffn(x, wgu, wd, g, 1e-6, r, backend="triton") for _ in range(3)]
    _check(outs[0], x, wgu, wd, g, r, torch.float32)
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], atol=0, rtol=0)
    assert int(counters(wd, launch_plan(7, 100, 256)).abs().sum()) == 0


def test_skinny_ffn_hands_other_shapes_to_two_launches() -> None:
    """A hidden size no slice of the configuration divides (F = 72), and more rows than the kernel
    takes: still the right result, through kernels.skinny_linear or torch."""
    assert launch_plan(3, 40, 72) is None and launch_plan(SKINNY_MAX_M + 1, 40, 128) is None
    x, wgu, wd, g, r = _case(3, 40, 72, torch.float32)
    _check(skinny_ffn(x, wgu, wd, g, 1e-6, r, backend="triton"), x, wgu, wd, g, r, torch.float32)
    x, wgu, wd, g, r = _case(SKINNY_MAX_M + 1, 40, 128, torch.float32)
    _check(skinny_ffn(x, wgu, wd, g, 1e-6, r, backend="torch"), x, wgu, wd, g, r, torch.float32)


def test_skinny_ffn_op_is_the_kernel() -> None:
    x, wgu, wd, g, r = _case(7, 48, 128, torch.float32)
    got = skinny_ffn_op(x, wgu, wd, g, 1e-6, r)
    torch.testing.assert_close(got, skinny_ffn(x, wgu, wd, g, 1e-6, r, backend="triton"), atol=0, rtol=0)


def test_skinny_ffn_rejects_bad_input() -> None:
    x, wgu, wd, g, r = _case(4, 48, 128, torch.float32)
    with pytest.raises(ValueError, match=r"must be \[2F, D\] and \[D, F\]"):
        skinny_ffn(x, wgu[:-1], wd, g, 1e-6, r, backend="triton")
    with pytest.raises(ValueError, match=r"norm_weight .* must be \[D=48\]"):
        skinny_ffn(x, wgu, wd, g[:-1], 1e-6, r, backend="triton")
    with pytest.raises(ValueError, match=r"residual .* must be \[M=4, D=48\]"):
        skinny_ffn(x, wgu, wd, g, 1e-6, r[:-1], backend="triton")
    with pytest.raises(TypeError, match="w_down's dtype"):
        skinny_ffn(x, wgu, wd.half(), g, 1e-6, r, backend="triton")
    with pytest.raises(ValueError, match=r"must be \[M, D\]"):
        skinny_ffn(x[0], wgu, wd, g, 1e-6, r, backend="triton")


@pytest.mark.skipif(DEVICE != "cuda", reason="the model takes the kernel for bf16/fp16 CUDA activations only")
def test_swiglu_takes_the_kernel_at_decode_sizes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The model's FFN (stacked gate/up, its norm and residual) through the one kernel gives what its
    two launches give, inside a CUDA graph too."""
    import services.engine.layers as layers

    torch.manual_seed(0)
    ffn = layers.SwiGLU(512, 1024).to(DEVICE, torch.bfloat16)
    norm = layers.RMSNorm(512, 1e-6).to(DEVICE, torch.bfloat16)
    ffn.fused = layers.fuse_linears(ffn.w_gate, ffn.w_up)
    x = torch.randn(7, 1, 512, device=DEVICE, dtype=torch.bfloat16)
    with torch.no_grad():
        monkeypatch.setattr(layers, "FUSED_FFN", False)
        want = ffn(x, norm, residual=x)
        monkeypatch.setattr(layers, "FUSED_FFN", True)
        got = ffn(x, norm, residual=x)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            replayed = ffn(x, norm, residual=x)
        graph.replay()
    assert got.shape == want.shape == x.shape
    for out in (got, replayed):
        assert float((out.float() - want.float()).abs().max() / want.float().abs().max()) < 2e-2


FINISH_SHAPES = {"m1-q64-d48-f128": (1, 64, 48, 128), "m7-q100-d100-f256": (7, 100, 100, 256),
                 "m16-q200-d64-f192": (16, 200, 64, 192)}
if DEVICE == "cuda":
    FINISH_SHAPES["m7-q3072-d3072-f8192"] = (7, 3072, 3072, 8192)


def _finish_case(m: int, q: int, d: int, f: int, dtype: torch.dtype):  # noqa: ANN202
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(m, q, generator=gen).to(DEVICE, dtype)
    w_o = (torch.randn(d, q, generator=gen) / q**0.5).to(DEVICE, dtype)
    return a, w_o, _case(m, d, f, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("shape", list(FINISH_SHAPES))
def test_skinny_finish(shape: str, dtype: torch.dtype) -> None:
    """A layer's output projection (Q split in slices, the last not full at Q = 100 and 200) and its
    FFN in one kernel, against the two steps' reference."""
    a, w_o, (_, wgu, wd, g, x) = _finish_case(*FINISH_SHAPES[shape], dtype)
    got = skinny_finish(a, w_o, x, wgu, wd, g, 1e-6, backend="triton")
    ref = skinny_finish_reference(*(t.double() for t in (a, w_o, x, wgu, wd, g)), 1e-6)
    assert got.dtype == dtype and got.shape == ref.shape
    err = float((got.double() - ref).abs().max() / ref.abs().max())
    assert err < TOL[dtype], f"relative error {err:.2e}"
    again = [skinny_finish(a, w_o, x, wgu, wd, g, 1e-6, backend="triton") for _ in range(2)]
    for out in again:
        torch.testing.assert_close(out, got, atol=0, rtol=0)


def test_skinny_finish_rejects_bad_input() -> None:
    a, w_o, (_, wgu, wd, g, x) = _finish_case(4, 64, 48, 128, torch.float32)
    with pytest.raises(ValueError, match=r"must be \[M, Q\] and \[D, Q\]"):
        skinny_finish(a, w_o[:, :-1], x, wgu, wd, g, 1e-6, backend="triton")
    with pytest.raises(ValueError, match=r"must be \[M, Q\] and \[D, Q\]"):
        skinny_finish(a[:-1], w_o, x, wgu, wd, g, 1e-6, backend="triton")
    with pytest.raises(TypeError, match="must have layer_in's dtype"):
        skinny_finish(a.half(), w_o, x, wgu, wd, g, 1e-6, backend="triton")
