"""Triton GEMM for a few rows: y[M, N] = x[M, K] @ w[N, K]^T with M <= 64, the decode step's
projections, where a GEMM's cost is reading its weight once.

A program owns BLOCK_N output columns and one slice of K: it computes the transposed tile
y^T[BLOCK_N, BLOCK_M] = w_tile @ x^T, the weight as the dot's left operand, so BLOCK_M (the
batch, padded) stays at 16 while the program streams BLOCK_N weight rows. K is split (split-K)
until there are enough programs to keep every SM's loads in flight - a 3072 x 3072 weight has
only 48 column blocks of 64 - and the last split of a column block to finish sums the partial
results in a fixed order (deterministic) and writes the output; a counter per column block, reset
by that program, says which is last.

The fusions a decoder layer needs ride along:

- NORM: RMSNorm of x in the prologue. x's sum of squares is accumulated from the same tiles the
  dot reads, the norm's weight multiplies each tile, and 1 / rms scales the accumulator at the end
  (rmsnorm(x) @ w^T = ((x * g) @ w^T) / rms(x)), so no normalised copy of x is ever written.
- SILU: x is [M, 2K], gate then up (a stacked gate/up projection's output): the input tile is
  silu(gate) * up, computed as it is loaded.
- RESIDUAL: y = residual + x @ w^T in the epilogue.
- ROPE and RING (a self layer's stacked q/k/v, `skinny_qkv`): with one head per column block,
  the q and k heads are rotated in the epilogue (rotate-half, by the step's cos and sin), and
  the k and v heads are also stored into their ring-buffer rows.

Launched with programmatic dependent launch (`pdl=True`, Hopper and later) the kernel lets the
next one launch at once, loads its first weight tile - weights are never written by a kernel -
and only then waits (`gdc_wait`) for the kernel before it to finish, before it reads x: a chain
of projections streams one weight while the previous GEMM drains.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _input_tile(x_ptr, nw_ptr, offs_m, offs_k, mask_m, M, k_end, stride_xm, K, sq,
                NORM: tl.constexpr, SILU: tl.constexpr):
    """x's [BLOCK_M, BLOCK_K] tile at columns offs_k (< k_end), as the dot's operand (x's dtype),
    and the running sum of squares of x's rows (NORM). With SILU, x's row is [gate (K) | up (K)]."""
    mask = mask_m[:, None] & (offs_k < k_end)[None, :]
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
        g = tl.load(nw_ptr + offs_k, mask=offs_k < k_end, other=0.0).to(tl.float32)
        xt = (xf * g[None, :]).to(x_ptr.dtype.element_ty)
    return xt, sq


@triton.jit
def prefetch_l2(ptrs):
    """Ask L2 for the 128-byte lines at `ptrs` (no registers written; PTX prefetch.global.L2)."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n mov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def _dot(w, xt, acc, IEEE: tl.constexpr):
    """acc += w @ xt^T (fp32 inputs in IEEE fp32, not TF32)."""
    if IEEE:
        return tl.dot(w, tl.trans(xt), acc, input_precision="ieee")
    return tl.dot(w, tl.trans(xt), acc)


@triton.jit
def _slice_dot(x_ptr, w_ptr, nw_ptr, offs_m, mask_m, offs_n, mask_n, M, K, k_start, k_end, stride_xm, stride_wn,
               BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, NORM: tl.constexpr,
               SILU: tl.constexpr, IEEE: tl.constexpr, USE_PDL: tl.constexpr, PRE_WAIT: tl.constexpr,
               PREFETCH_LINES: tl.constexpr, LINE: tl.constexpr, EVICT_W: tl.constexpr,
               ORDER: tl.constexpr, POST_LINES: tl.constexpr):
    """One column block's partial product over K columns k_start .. k_end (a multiple of BLOCK_K
    apart from K's end): acc [BLOCK_N, BLOCK_M] = w[offs_n, k] @ f(x)[:, k]^T and x's sum of squares
    there (NORM). With USE_PDL, the program lets the next kernel launch, and PRE_WAIT weight tiles
    (and the L2 prefetch of PREFETCH_LINES lines) are issued before the wait on the kernel ahead,
    which x's loads come after.

    ORDER says what follows the wait: 0, each early tile's x tile loaded and its dot done in turn
    (each x load waits for the dot before it), then the pipelined loop; 1, the early tiles' x tiles
    loaded together, then their dots, then the loop. Either way the loop's first weight loads come
    after the early dots. (The loop first and the early dots after it would put them right after
    the wait, but the early tiles' shared-memory buffers then stay live through the loop: 209 KB a
    program for the 128 x 128 tiles, 418 KB for the LM head's - one program an SM, or none.)
    POST_LINES > 0: right after the wait, L2 is asked for that many lines of each weight row past
    the early tiles (the loop's first tiles), before x is loaded."""
    offs_k = k_start + tl.arange(0, BLOCK_K)
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
    # The first PRE_WAIT (1 to 3) weight tiles are in flight before the wait: no kernel writes a
    # weight. Tiles past the slice's end load as zeros (their x tiles are zeros too).
    w = tl.load(w_rows + offs_k[None, :], mask=mask_n[:, None] & (offs_k < k_end)[None, :], other=0.0,
                eviction_policy=EVICT_W)
    if PRE_WAIT >= 2:
        w1 = tl.load(w_rows + (offs_k + BLOCK_K)[None, :], mask=mask_n[:, None] & (offs_k + BLOCK_K < k_end)[None, :],
                     other=0.0, eviction_policy=EVICT_W)
    if PRE_WAIT >= 3:
        w2 = tl.load(w_rows + (offs_k + 2 * BLOCK_K)[None, :],
                     mask=mask_n[:, None] & (offs_k + 2 * BLOCK_K < k_end)[None, :], other=0.0,
                     eviction_policy=EVICT_W)
    if PREFETCH_LINES > 0:
        # The rest of this program's weight slice on its way to L2 while the kernel before still
        # runs (what the wait below would otherwise leave idle); out-of-range lines and rows
        # clamped to ones in range.
        lines = k_start + PRE_WAIT * BLOCK_K + tl.arange(0, PREFETCH_LINES) * LINE
        lines = tl.where(lines < k_end, lines, k_start)
        rows = w_ptr + tl.where(mask_n, offs_n, 0).to(tl.int64)[:, None] * stride_wn
        prefetch_l2(rows + lines[None, :])
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
    if POST_LINES > 0:
        lines = k_start + PRE_WAIT * BLOCK_K + tl.arange(0, POST_LINES) * LINE
        lines = tl.where(lines < k_end, lines, k_start)
        prefetch_l2(w_ptr + tl.where(mask_n, offs_n, 0).to(tl.int64)[:, None] * stride_wn + lines[None, :])
    sq = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    # ORDER 0 does each early tile's dot as soon as its x tile is in; ORDER 1 all of them after.
    xt, sq = _input_tile(x_ptr, nw_ptr, offs_m, offs_k, mask_m, M, k_end, stride_xm, K, sq, NORM, SILU)
    if ORDER == 0:
        acc = _dot(w, xt, acc, IEEE)
    if PRE_WAIT >= 2:
        xt1, sq = _input_tile(x_ptr, nw_ptr, offs_m, offs_k + BLOCK_K, mask_m, M, k_end, stride_xm, K, sq, NORM, SILU)
        if ORDER == 0:
            acc = _dot(w1, xt1, acc, IEEE)
    if PRE_WAIT >= 3:
        xt2, sq = _input_tile(x_ptr, nw_ptr, offs_m, offs_k + 2 * BLOCK_K, mask_m, M, k_end, stride_xm, K, sq, NORM,
                              SILU)
        if ORDER == 0:
            acc = _dot(w2, xt2, acc, IEEE)
    if ORDER == 1:
        acc = _dot(w, xt, acc, IEEE)
        if PRE_WAIT >= 2:
            acc = _dot(w1, xt1, acc, IEEE)
        if PRE_WAIT >= 3:
            acc = _dot(w2, xt2, acc, IEEE)
    for k0 in range(k_start + PRE_WAIT * BLOCK_K, k_end, BLOCK_K):
        ks = k0 + offs_k - k_start
        w = tl.load(w_rows + ks[None, :], mask=mask_n[:, None] & (ks < k_end)[None, :], other=0.0,
                    eviction_policy=EVICT_W)
        xt, sq = _input_tile(x_ptr, nw_ptr, offs_m, ks, mask_m, M, k_end, stride_xm, K, sq, NORM, SILU)
        acc = _dot(w, xt, acc, IEEE)
    return acc, sq


@triton.jit
def _skinny_gemm_kernel(
    x_ptr, w_ptr, out_ptr, res_ptr, nw_ptr, part_ptr, sq_ptr, count_ptr, M, N, K, k_slice, eps,
    stride_xm, stride_wn, stride_om, stride_rm,
    cos_ptr, sin_ptr, ring_k_ptr, ring_v_ptr, slot_ptr, ring_row_ptr, rope_cols, k_col0, v_col0,
    stride_ring_slot, stride_ring_row,
    SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    NORM: tl.constexpr, SILU: tl.constexpr, RESIDUAL: tl.constexpr, IEEE: tl.constexpr, USE_PDL: tl.constexpr,
    PREFETCH_LINES: tl.constexpr, LINE: tl.constexpr, ROPE: tl.constexpr, RING: tl.constexpr,
    PRE_WAIT: tl.constexpr, EVICT_W: tl.constexpr, ORDER: tl.constexpr, POST_LINES: tl.constexpr,
):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    k_start = split * k_slice
    k_end = tl.minimum(k_start + k_slice, K)
    mask_n = offs_n < N
    mask_m = offs_m < M
    acc, sq = _slice_dot(x_ptr, w_ptr, nw_ptr, offs_m, mask_m, offs_n, mask_n, M, K, k_start, k_end, stride_xm,
                         stride_wn, BLOCK_N, BLOCK_M, BLOCK_K, NORM, SILU, IEEE, USE_PDL, PRE_WAIT,
                         PREFETCH_LINES, LINE, EVICT_W, ORDER, POST_LINES)
    mask = mask_n[:, None] & mask_m[None, :]
    if SPLIT_K > 1:
        # Split-K: each split leaves its partial sums (and its slice's sum of squares); the last
        # split of this column block to finish adds them up in split order (so the result does
        # not depend on which finished last) and resets the counter for the next launch.
        tl.store(part_ptr + (split * BLOCK_M + offs_m)[None, :] * N + offs_n[:, None], acc, mask=mask)
        if NORM:
            tl.store(sq_ptr + (pid_n * SPLIT_K + split) * BLOCK_M + offs_m, sq, mask=mask_m)
        tl.debug_barrier()
        done = tl.atomic_add(count_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        if done == SPLIT_K - 1:
            acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
            sq = tl.zeros([BLOCK_M], tl.float32)
            for s in tl.static_range(SPLIT_K):
                acc += tl.load(part_ptr + (s * BLOCK_M + offs_m)[None, :] * N + offs_n[:, None], mask=mask,
                               other=0.0, cache_modifier=".cg")
                if NORM:
                    sq += tl.load(sq_ptr + (pid_n * SPLIT_K + s) * BLOCK_M + offs_m, mask=mask_m, other=0.0,
                                  cache_modifier=".cg")
            _epilogue(acc, sq, res_ptr, out_ptr, offs_m, offs_n, mask, pid_n, M, K, eps, stride_rm, stride_om,
                      cos_ptr, sin_ptr, ring_k_ptr, ring_v_ptr, slot_ptr, ring_row_ptr, rope_cols, k_col0,
                      v_col0, stride_ring_slot, stride_ring_row, BLOCK_N, BLOCK_M, NORM, RESIDUAL, ROPE, RING)
            tl.store(count_ptr + pid_n, 0)
    else:
        _epilogue(acc, sq, res_ptr, out_ptr, offs_m, offs_n, mask, pid_n, M, K, eps, stride_rm, stride_om,
                  cos_ptr, sin_ptr, ring_k_ptr, ring_v_ptr, slot_ptr, ring_row_ptr, rope_cols, k_col0, v_col0,
                  stride_ring_slot, stride_ring_row, BLOCK_N, BLOCK_M, NORM, RESIDUAL, ROPE, RING)


@triton.jit
def _epilogue(acc, sq, res_ptr, out_ptr, offs_m, offs_n, mask, pid_n, M, K, eps, stride_rm, stride_om,
              cos_ptr, sin_ptr, ring_k_ptr, ring_v_ptr, slot_ptr, ring_row_ptr, rope_cols, k_col0, v_col0,
              stride_ring_slot, stride_ring_row, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
              NORM: tl.constexpr, RESIDUAL: tl.constexpr, ROPE: tl.constexpr, RING: tl.constexpr):
    """out^T[offs_n, offs_m] = acc / rms(x) (NORM), rotated (ROPE: a column block below
    `rope_cols` is one head), + residual^T (RESIDUAL); with RING, the K and V heads' columns
    (k_col0 .. v_col0, v_col0 .. N) also go to row ring_row[m] of slot slot[m] of the rings."""
    if NORM:
        acc = acc * tl.rsqrt(sq / K + eps)[None, :]
    if ROPE:
        if pid_n * BLOCK_N < rope_cols:
            acc = _rotate_half(acc, cos_ptr, sin_ptr, offs_m, offs_m < M, BLOCK_N, BLOCK_M)
    if RESIDUAL:
        res = tl.load(res_ptr + offs_m.to(tl.int64)[None, :] * stride_rm + offs_n[:, None], mask=mask, other=0.0)
        acc += res.to(tl.float32)
    tl.store(out_ptr + offs_m.to(tl.int64)[None, :] * stride_om + offs_n[:, None],
             acc.to(out_ptr.dtype.element_ty), mask=mask)
    if RING:
        col0 = pid_n * BLOCK_N
        if col0 >= k_col0:
            slot = tl.load(slot_ptr + offs_m, mask=offs_m < M, other=0)
            row = tl.load(ring_row_ptr + offs_m, mask=offs_m < M, other=0)
            dest = slot.to(tl.int64)[None, :] * stride_ring_slot + row.to(tl.int64)[None, :] * stride_ring_row
            if col0 < v_col0:
                tl.store(ring_k_ptr + dest + (offs_n - k_col0)[:, None], acc.to(ring_k_ptr.dtype.element_ty),
                         mask=mask)
            else:
                tl.store(ring_v_ptr + dest + (offs_n - v_col0)[:, None], acc.to(ring_v_ptr.dtype.element_ty),
                         mask=mask)


@triton.jit
def _rotate_half(acc, cos_ptr, sin_ptr, offs_m, mask_m, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    """RoPE of one head's [d = BLOCK_N, BLOCK_M] tile (rotate-half: column j pairs with j + d / 2),
    by cos and sin [M, d / 2] fp32."""
    HALF: tl.constexpr = BLOCK_N // 2
    offs_j = tl.arange(0, HALF)
    angle = offs_m[None, :] * HALF + offs_j[:, None]
    c = tl.load(cos_ptr + angle, mask=mask_m[None, :], other=1.0)
    s = tl.load(sin_ptr + angle, mask=mask_m[None, :], other=0.0)
    x1, x2 = tl.split(tl.permute(tl.reshape(acc, (2, HALF, BLOCK_M)), (1, 2, 0)))
    rotated = tl.join(x1 * c - x2 * s, x2 * c + x1 * s)  # [HALF, BLOCK_M, 2]
    return tl.reshape(tl.permute(rotated, (2, 0, 1)), (BLOCK_N, BLOCK_M))


def launch_skinny_gemm(x, w, out, residual, norm_weight, eps: float, part, sq, counters, *, silu: bool,
                       block_n: int, block_k: int, split_k: int, num_warps: int, num_stages: int,
                       pdl: bool, prefetch: bool = False, rope=None, ring=None, pre_wait_tiles: int = 1,
                       weight_eviction: str = "", post_wait_order: int = 0, post_wait_prefetch: int = 0) -> None:
    """out[M, N] = f(x) @ w^T (+ residual): x [M, K] (or [M, 2K] with `silu`), w [N, K], out and
    residual [M, N], every last dim contiguous; `norm_weight` [K] or None (no RMSNorm). With
    `split_k` > 1, K is cut into that many slices (multiples of block_k), one program each:
    `part` fp32 [split_k * BLOCK_M * N] and `sq` fp32 [cdiv(N, block_n) * split_k * BLOCK_M]
    hold their partial results, `counters` int32 [cdiv(N, block_n)] must be zero (and are left
    zero). `pre_wait_tiles` (1 to 3): weight tiles each program loads before its PDL wait.
    `weight_eviction`: the L2 eviction policy of the weight loads ("", "evict_first", "evict_last").
    `post_wait_order` (0, 1): what follows the PDL wait (`_slice_dot`'s ORDER).
    `post_wait_prefetch`: weight tiles past the early ones that each program asks L2 for right after
    its PDL wait, before it loads x (compiled only, as `prefetch`).
    `prefetch`: each program asks L2 for the rest of its weight slice (past those tiles) before its
    PDL wait (compiled only: the interpreter has no inline assembly). `rope`: (cos, sin, rope_cols) - cos
    and sin fp32 [M, block_n / 2] contiguous, the first rope_cols columns rotated, one head of
    block_n columns per column block. `ring`: (ring_k, ring_v, slots, ring_rows, k_col0, v_col0) -
    rings [slots, W, ...] whose rows are contiguous, columns k_col0 .. v_col0 of out written to
    ring_k[slots[m], ring_rows[m]], columns v_col0 .. N to ring_v."""
    m, n, k = out.shape[0], w.shape[0], w.shape[1]
    block_m = max(16, triton.next_power_of_2(m))
    k_slice = triton.cdiv(triton.cdiv(k, split_k), block_k) * block_k
    split_k = triton.cdiv(k, k_slice)
    line = 128 // w.element_size()
    prefetch_lines = 0
    if prefetch and k_slice > pre_wait_tiles * block_k:  # the lines past the tiles loaded before the wait
        prefetch_lines = triton.next_power_of_2(triton.cdiv(k_slice - pre_wait_tiles * block_k, line))
    post_lines = 0
    if post_wait_prefetch and k_slice > pre_wait_tiles * block_k:
        ahead = min(post_wait_prefetch * block_k, k_slice - pre_wait_tiles * block_k)
        post_lines = triton.next_power_of_2(triton.cdiv(ahead, line))
    _skinny_gemm_kernel[(triton.cdiv(n, block_n), split_k)](
        x, w, out, residual if residual is not None else out, norm_weight if norm_weight is not None else w,
        part if split_k > 1 else out, sq if split_k > 1 else out, counters if split_k > 1 else out,
        m, n, k, k_slice, eps, x.stride(0), w.stride(0), out.stride(0),
        residual.stride(0) if residual is not None else 0,
        *(rope[:2] if rope is not None else (out, out)), *(ring[:4] if ring is not None else (out,) * 4),
        rope[2] if rope is not None else 0, *(ring[4:] if ring is not None else (0, 0)),
        *((ring[0].stride(0), ring[0].stride(1)) if ring is not None else (0, 0)),
        SPLIT_K=split_k, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, NORM=norm_weight is not None,
        SILU=silu, RESIDUAL=residual is not None, IEEE=x.dtype.itemsize == 4, USE_PDL=pdl,
        PREFETCH_LINES=prefetch_lines, LINE=line, ROPE=rope is not None, RING=ring is not None,
        PRE_WAIT=pre_wait_tiles, EVICT_W=weight_eviction, ORDER=post_wait_order, POST_LINES=post_lines,
        num_warps=num_warps, num_stages=num_stages,
        **({"launch_pdl": True} if pdl else {}),
    )
