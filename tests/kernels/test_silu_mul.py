"""The SwiGLU gate kernel (kernels/silu_mul.py) against its reference: interpreted on the CPU (CI),
compiled on a CUDA device with TRITON_INTERPRET=0. Sizes off the tile (rows and columns not
multiples of it), a batch of chunks, a strided input, the op the compiled layers call, and the
model's FFN through it."""

from __future__ import annotations

import pytest
import torch

import services.engine.layers as layers
from kernels.silu_mul import silu_mul, silu_mul_op, silu_mul_reference
from tests.kernels.triton_device import DEVICE, DTYPES

TOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}  # relative, per element
DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _close(got: torch.Tensor, x: torch.Tensor) -> None:
    gate, up = x.double().chunk(2, dim=-1)
    want = torch.nn.functional.silu(gate) * up
    assert got.dtype == x.dtype and got.shape == want.shape
    err = (got.double() - want).abs() / (want.abs() + 1e-3)
    assert float(err.max()) < TOL[x.dtype], f"relative error {float(err.max()):.2e}"


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("shape", [(1, 2), (3, 70), (33, 130), (2, 5, 64)], ids=str)
def test_silu_mul_matches_the_reference(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape))) * 3).to(DEVICE, dtype)
    _close(silu_mul(x, backend="triton"), x)


def test_silu_mul_reads_a_strided_input_and_writes_into_out() -> None:
    wide = torch.randn(9, 100, device=DEVICE)
    x = wide[:, 10:90]  # rows 100 apart
    out = torch.full((9, 40), float("nan"), device=DEVICE)
    assert silu_mul(x, backend="triton", out=out) is out
    _close(out, x)
    assert silu_mul(x[:0], backend="triton").shape == (0, 40)


def test_silu_mul_rejects_bad_input() -> None:
    x = torch.randn(4, 6, device=DEVICE)
    with pytest.raises(ValueError, match="even"):
        silu_mul(x[:, :5], backend="triton")
    with pytest.raises(ValueError, match="out must be"):
        silu_mul(x, backend="triton", out=torch.empty(4, 4, device=DEVICE))
    with pytest.raises(TypeError, match="must be one of"):
        silu_mul(x.long(), backend="triton")


def test_silu_mul_op_is_the_kernel() -> None:
    x = torch.randn(5, 48, device=DEVICE)
    torch.testing.assert_close(silu_mul_op(x), silu_mul(x, backend="triton"), atol=0, rtol=0)
    assert silu_mul_reference(x).shape == (5, 24)


def test_the_ffn_through_the_kernel_matches_torch_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stacked SwiGLU with the gate through the kernel (as on a GPU at prefill) gives the output
    of torch's ops."""
    torch.manual_seed(0)
    ffn = layers.SwiGLU(32, 48).to(DEVICE)
    ffn.fused = layers.fuse_linears(ffn.w_gate, ffn.w_up)
    x, res = torch.randn(2, 7, 32, device=DEVICE), torch.randn(2, 7, 32, device=DEVICE)
    with torch.no_grad():
        want = ffn(x, residual=res)
        calls = []
        monkeypatch.setattr(layers, "use_silu_kernel", lambda t, w: True)
        monkeypatch.setattr(layers, "silu_mul_op", lambda t: calls.append(t.shape) or silu_mul(t, backend="triton"))
        got = ffn(x, residual=res)
    assert calls == [(2, 7, 96)]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
