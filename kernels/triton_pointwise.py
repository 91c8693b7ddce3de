"""Triton pointwise kernels of the prefill path (bandwidth-bound passes over [tokens, features]).

`_silu_mul_kernel`: out[m, f] = silu(x[m, f]) * x[m, F + f] for a stacked gate/up output x
[M, 2F]. A program owns BLOCK_M rows by BLOCK_F columns: each row's gate and up slices are
contiguous runs of BLOCK_F elements (16-byte vector loads), computed in fp32, stored in out's
dtype. Row offsets are 64-bit: at 128K tokens x 16K columns an offset passes 2^31.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, M, F, stride_xm, stride_om, BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask = (rows[:, None] < M) & (cols[None, :] < F)
    x_row = x_ptr + rows.to(tl.int64)[:, None] * stride_xm + cols[None, :]
    gate = tl.load(x_row, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_row + F, mask=mask, other=0.0).to(tl.float32)
    y = gate * tl.sigmoid(gate) * up
    out = out_ptr + rows.to(tl.int64)[:, None] * stride_om + cols[None, :]
    tl.store(out, y.to(out_ptr.dtype.element_ty), mask=mask)


def launch_silu_mul(x, out, *, block_m: int, block_f: int, num_warps: int) -> None:
    """out [M, F] = silu(x[:, :F]) * x[:, F:] for x [M, 2F]; both with contiguous rows."""
    m, f = out.shape
    grid = (triton.cdiv(m, block_m), triton.cdiv(f, block_f))
    _silu_mul_kernel[grid](x, out, m, f, x.stride(0), out.stride(0), BLOCK_M=block_m, BLOCK_F=block_f,
                           num_warps=num_warps)
