"""Triton GEMM for a few rows: y[M, N] = x[M, K] @ w[N, K]^T with M <= 64, the decode step's
projections, where a GEMM's cost is reading its weight once.

One program owns BLOCK_N output columns and walks the whole of K (no split-K, so no reduction
pass and no workspace): it computes the transposed tile y^T[BLOCK_N, BLOCK_M] = w_tile @ x^T, the
weight as the dot's left operand, so BLOCK_M (the batch, padded) can stay at 16 while each program
streams BLOCK_N full weight rows. The fusions a decoder layer needs ride along:

- NORM: RMSNorm of x in the prologue. x's sum of squares is accumulated from the same tiles the
  dot reads, the norm's weight multiplies each tile, and 1 / rms scales the accumulator at the end
  (rmsnorm(x) @ w^T = ((x * g) @ w^T) / rms(x)), so no normalised copy of x is ever written.
- SILU: x is [M, 2K], gate then up (a stacked gate/up projection's output): the input tile is
  silu(gate) * up, computed as it is loaded.
- RESIDUAL: y = residual + x @ w^T in the epilogue.

Launched with programmatic dependent launch (`pdl=True`, Hopper and later) the kernel lets the
next one launch at once, loads its first weight tile - weights are never written by a kernel -
and only then waits (`gdc_wait`) for the kernel before it to finish, before it reads x: a chain
of projections streams one weight while the previous GEMM drains.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _input_tile(x_ptr, nw_ptr, offs_m, offs_k, mask_m, M, K, stride_xm, sq,
                NORM: tl.constexpr, SILU: tl.constexpr):
    """x's [BLOCK_M, BLOCK_K] tile at columns offs_k, as the dot's operand (x's dtype), and the
    running sum of squares of x's rows (NORM)."""
    mask = mask_m[:, None] & (offs_k < K)[None, :]
    rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    if SILU:
        gate = tl.load(rows + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
        up = tl.load(rows + K + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
        xf = gate / (1.0 + tl.exp(-gate)) * up
        xt = xf.to(x_ptr.dtype.element_ty)
    else:
        xt = tl.load(rows + offs_k[None, :], mask=mask, other=0.0)
    if NORM:
        xf = xt.to(tl.float32)
        sq += tl.sum(xf * xf, axis=1)
        g = tl.load(nw_ptr + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
        xt = (xf * g[None, :]).to(x_ptr.dtype.element_ty)
    return xt, sq


@triton.jit
def _dot(w, xt, acc, IEEE: tl.constexpr):
    """acc += w @ xt^T (fp32 inputs in IEEE fp32, not TF32)."""
    if IEEE:
        return tl.dot(w, tl.trans(xt), acc, input_precision="ieee")
    return tl.dot(w, tl.trans(xt), acc)


@triton.jit
def _skinny_gemm_kernel(
    x_ptr, w_ptr, out_ptr, res_ptr, nw_ptr, M, N, K, eps,
    stride_xm, stride_wn, stride_om, stride_rm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    NORM: tl.constexpr, SILU: tl.constexpr, RESIDUAL: tl.constexpr, IEEE: tl.constexpr, USE_PDL: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    mask_n = offs_n < N
    mask_m = offs_m < M
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
    # The first weight tile is in flight before the wait: no kernel writes a weight.
    w = tl.load(w_rows + offs_k[None, :], mask=mask_n[:, None] & (offs_k < K)[None, :], other=0.0)
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
    sq = tl.zeros([BLOCK_M], tl.float32)
    xt, sq = _input_tile(x_ptr, nw_ptr, offs_m, offs_k, mask_m, M, K, stride_xm, sq, NORM, SILU)
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    acc = _dot(w, xt, acc, IEEE)
    for k0 in range(BLOCK_K, K, BLOCK_K):
        ks = k0 + offs_k
        w = tl.load(w_rows + ks[None, :], mask=mask_n[:, None] & (ks < K)[None, :], other=0.0)
        xt, sq = _input_tile(x_ptr, nw_ptr, offs_m, ks, mask_m, M, K, stride_xm, sq, NORM, SILU)
        acc = _dot(w, xt, acc, IEEE)
    if NORM:
        acc = acc * tl.rsqrt(sq / K + eps)[None, :]
    mask = mask_n[:, None] & mask_m[None, :]
    if RESIDUAL:
        res = tl.load(res_ptr + offs_m.to(tl.int64)[None, :] * stride_rm + offs_n[:, None], mask=mask, other=0.0)
        acc += res.to(tl.float32)
    tl.store(out_ptr + offs_m.to(tl.int64)[None, :] * stride_om + offs_n[:, None],
             acc.to(out_ptr.dtype.element_ty), mask=mask)


def launch_skinny_gemm(x, w, out, residual, norm_weight, eps: float, *, silu: bool, block_n: int, block_k: int,
                       num_warps: int, num_stages: int, pdl: bool) -> None:
    """out[M, N] = f(x) @ w^T (+ residual): x [M, K] (or [M, 2K] with `silu`), w [N, K], out and
    residual [M, N], every last dim contiguous; `norm_weight` [K] or None (no RMSNorm)."""
    m, n, k = out.shape[0], w.shape[0], w.shape[1]
    block_m = max(16, triton.next_power_of_2(m))
    _skinny_gemm_kernel[(triton.cdiv(n, block_n),)](
        x, w, out, residual if residual is not None else out, norm_weight if norm_weight is not None else w,
        m, n, k, eps, x.stride(0), w.stride(0), out.stride(0),
        residual.stride(0) if residual is not None else 0,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, NORM=norm_weight is not None, SILU=silu,
        RESIDUAL=residual is not None, IEEE=x.dtype.itemsize == 4, USE_PDL=pdl,
        num_warps=num_warps, num_stages=num_stages, **({"launch_pdl": True} if pdl else {}),
    )
