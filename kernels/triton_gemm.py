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
def _prefetch_l2(ptrs):
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
def _skinny_gemm_kernel(
    x_ptr, w_ptr, out_ptr, res_ptr, nw_ptr, part_ptr, sq_ptr, count_ptr, M, N, K, k_slice, eps,
    stride_xm, stride_wn, stride_om, stride_rm,
    cos_ptr, sin_ptr, ring_k_ptr, ring_v_ptr, slot_ptr, ring_row_ptr, rope_cols, k_col0, v_col0,
    stride_ring_slot, stride_ring_row,
    SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    NORM: tl.constexpr, SILU: tl.constexpr, RESIDUAL: tl.constexpr, IEEE: tl.constexpr, USE_PDL: tl.constexpr,
    PREFETCH_LINES: tl.constexpr, LINE: tl.constexpr, ROPE: tl.constexpr, RING: tl.constexpr,
    PRE_WAIT: tl.constexpr, EVICT_W: tl.constexpr,
):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    k_start = split * k_slice
    k_end = tl.minimum(k_start + k_slice, K)
    offs_k = k_start + tl.arange(0, BLOCK_K)
    mask_n = offs_n < N
    mask_m = offs_m < M
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
        lines = k_start + BLOCK_K + tl.arange(0, PREFETCH_LINES) * LINE
        lines = tl.where(lines < k_end, lines, k_start)
        rows = w_ptr + tl.where(mask_n, offs_n, 0).to(tl.int64)[:, None] * stride_wn
        _prefetch_l2(rows + lines[None, :])
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
    sq = tl.zeros([BLOCK_M], tl.float32)
    xt, sq = _input_tile(x_ptr, nw_ptr, offs_m, offs_k, mask_m, M, k_end, stride_xm, K, sq, NORM, SILU)
    acc = _dot(w, xt, tl.zeros([BLOCK_N, BLOCK_M], tl.float32), IEEE)
    if PRE_WAIT >= 2:
        xt, sq = _input_tile(x_ptr, nw_ptr, offs_m, offs_k + BLOCK_K, mask_m, M, k_end, stride_xm, K, sq, NORM, SILU)
        acc = _dot(w1, xt, acc, IEEE)
    if PRE_WAIT >= 3:
        xt, sq = _input_tile(x_ptr, nw_ptr, offs_m, offs_k + 2 * BLOCK_K, mask_m, M, k_end, stride_xm, K, sq, NORM,
                             SILU)
        acc = _dot(w2, xt, acc, IEEE)
    for k0 in range(k_start + PRE_WAIT * BLOCK_K, k_end, BLOCK_K):
        ks = k0 + offs_k - k_start
        w = tl.load(w_rows + ks[None, :], mask=mask_n[:, None] & (ks < k_end)[None, :], other=0.0,
                    eviction_policy=EVICT_W)
        xt, sq = _input_tile(x_ptr, nw_ptr, offs_m, ks, mask_m, M, k_end, stride_xm, K, sq, NORM, SILU)
        acc = _dot(w, xt, acc, IEEE)
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
                       weight_eviction: str = "") -> None:
    """out[M, N] = f(x) @ w^T (+ residual): x [M, K] (or [M, 2K] with `silu`), w [N, K], out and
    residual [M, N], every last dim contiguous; `norm_weight` [K] or None (no RMSNorm). With
    `split_k` > 1, K is cut into that many slices (multiples of block_k), one program each:
    `part` fp32 [split_k * BLOCK_M * N] and `sq` fp32 [cdiv(N, block_n) * split_k * BLOCK_M]
    hold their partial results, `counters` int32 [cdiv(N, block_n)] must be zero (and are left
    zero). `pre_wait_tiles` (1 to 3): weight tiles each program loads before its PDL wait.
    `weight_eviction`: the L2 eviction policy of the weight loads ("", "evict_first", "evict_last").
    `prefetch`: each program asks L2 for its whole weight slice before its PDL wait
    (compiled only: the interpreter has no inline assembly). `rope`: (cos, sin, rope_cols) - cos
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
    if prefetch and k_slice > block_k:
        prefetch_lines = triton.next_power_of_2(triton.cdiv(k_slice - block_k, line))
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
        PRE_WAIT=pre_wait_tiles, EVICT_W=weight_eviction, num_warps=num_warps, num_stages=num_stages,
        **({"launch_pdl": True} if pdl else {}),
    )


@triton.jit
def _normed_tile(x_ptr, nw_ptr, offs_m, offs_k, mask_m, D, stride_xm, sq, CG: tl.constexpr):
    """x's [BLOCK_M, BLOCK_K] tile times the norm's weight (x's dtype) and the running sum of
    squares of x's rows; CG: x was written by this kernel's other programs (loads skip L1)."""
    mask = mask_m[:, None] & (offs_k < D)[None, :]
    ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :]
    if CG:
        xf = tl.load(ptrs, mask=mask, other=0.0, cache_modifier=".cg").to(tl.float32)
    else:
        xf = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    sq += tl.sum(xf * xf, axis=1)
    g = tl.load(nw_ptr + offs_k, mask=offs_k < D, other=0.0).to(tl.float32)
    return (xf * g[None, :]).to(x_ptr.dtype.element_ty), sq


@triton.jit
def _spin_until(ptr, need):
    """Waits until the counter at `ptr` reaches `need` (acquire: what was written before each
    increment is visible after)."""
    ready = tl.atomic_add(ptr, 0, sem="acquire", scope="gpu")
    while ready < need:
        ready = tl.atomic_add(ptr, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()


@triton.jit
def _skinny_ffn_kernel(
    x_ptr, wgu_ptr, wd_ptr, nw_ptr, res_ptr, out_ptr, h_ptr, part_ptr, count_ptr,
    a_ptr, wo_ptr, ores_ptr, part_o_ptr,
    M, D, F, Q, eps, stride_xm, stride_rm, stride_om, stride_am, stride_orm, n_a, n_cb,
    BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    K_SLICE: tl.constexpr, SPLIT: tl.constexpr, K_SLICE_O: tl.constexpr, SPLIT_O: tl.constexpr,
    HAS_O: tl.constexpr, IEEE: tl.constexpr, USE_PDL: tl.constexpr, PRE_WAIT: tl.constexpr,
):
    """A whole decode FFN, out = residual + w_down @ (silu(g) * u), [g | u] = rmsnorm(x) @ w_gu^T, in
    one launch. Each program takes the next tile from a counter (so tiles are taken in the order
    programs start): first the n_a gate/up tiles (BLOCK_F columns of g and of u over all of K = D,
    h = silu(g) * u written to h_ptr), then the down tiles (BLOCK_N output columns x one K_SLICE of
    h, split-K). A down tile waits on a counter of its slice's gate/up tiles: those were all taken
    before it, by programs that are running and wait on nothing but the kernel ahead (and tiles
    taken before theirs), so the wait ends.

    HAS_O puts the attention's output projection ahead of them (a layer's whole `finish`): first
    n_cb * SPLIT_O tiles of x = ores + a @ w_o^T (BLOCK_N columns x one K_SLICE_O of a's Q, split-K),
    written to x_ptr (then also res_ptr); the gate/up tiles wait until every column of x is in.

    Counters (this weight's own): [0] tiles taken, mod the tile count; [1] programs done; [2] x's
    column blocks done; [3 + c] output-projection splits done in column block c; [3 + n_cb + s]
    gate/up tiles done in slice s; [3 + n_cb + SPLIT + c] down splits done in column block c. Only
    [0] is touched before the PDL wait, and before the program lets the next kernel launch: a
    launch's tiles are all taken before the next launch's first, so each launch takes one residue
    class, whatever the counter's value. The last program to finish takes n_tiles off [0] and
    zeroes the others (after the wait: the next launch reads them only after this one has ended)."""
    n_o = n_cb * SPLIT_O if HAS_O else 0
    n_tiles = n_o + n_a + n_cb * SPLIT
    c_slices = count_ptr + 3 + n_cb
    c_down = c_slices + SPLIT
    tile = tl.atomic_add(count_ptr, 1) % n_tiles
    if USE_PDL:
        if tile >= 0:  # always: the branch makes the trigger wait for the atomic's value
            tl.extra.cuda.gdc_launch_dependents()
    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    offs_kb = tl.arange(0, BLOCK_K)
    if HAS_O:
        is_o = tile < n_o
    else:
        is_o = False  # static: without the output projection its branch is not compiled
    if is_o:
        cb = tile % n_cb
        so = tile // n_cb
        offs_n = cb * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < D
        k_start = so * K_SLICE_O
        k_end = tl.minimum(k_start + K_SLICE_O, Q)
        o_rows = wo_ptr + offs_n.to(tl.int64)[:, None] * Q
        a_rows = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am
        ks = k_start + offs_kb
        w = tl.load(o_rows + ks[None, :], mask=mask_n[:, None] & (ks < k_end)[None, :], other=0.0)
        if PRE_WAIT >= 2:
            w1 = tl.load(o_rows + (ks + BLOCK_K)[None, :], mask=mask_n[:, None] & (ks + BLOCK_K < k_end)[None, :],
                         other=0.0)
        if USE_PDL:
            tl.extra.cuda.gdc_wait()
        at = tl.load(a_rows + ks[None, :], mask=mask_m[:, None] & (ks < k_end)[None, :], other=0.0)
        acc = _dot(w, at, tl.zeros([BLOCK_N, BLOCK_M], tl.float32), IEEE)
        if PRE_WAIT >= 2:
            at = tl.load(a_rows + (ks + BLOCK_K)[None, :], mask=mask_m[:, None] & (ks + BLOCK_K < k_end)[None, :],
                         other=0.0)
            acc = _dot(w1, at, acc, IEEE)
        for k0 in range(k_start + PRE_WAIT * BLOCK_K, k_end, BLOCK_K):
            ks = k0 + offs_kb
            w = tl.load(o_rows + ks[None, :], mask=mask_n[:, None] & (ks < k_end)[None, :], other=0.0)
            at = tl.load(a_rows + ks[None, :], mask=mask_m[:, None] & (ks < k_end)[None, :], other=0.0)
            acc = _dot(w, at, acc, IEEE)
        mask = mask_n[:, None] & mask_m[None, :]
        tl.store(part_o_ptr + (so * BLOCK_M + offs_m)[None, :] * D + offs_n[:, None], acc, mask=mask)
        tl.debug_barrier()
        done = tl.atomic_add(count_ptr + 3 + cb, 1, sem="acq_rel", scope="gpu")
        if done == SPLIT_O - 1:
            acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
            for t in tl.static_range(SPLIT_O):
                acc += tl.load(part_o_ptr + (t * BLOCK_M + offs_m)[None, :] * D + offs_n[:, None], mask=mask,
                               other=0.0, cache_modifier=".cg")
            res = tl.load(ores_ptr + offs_m.to(tl.int64)[None, :] * stride_orm + offs_n[:, None], mask=mask,
                          other=0.0)
            acc += res.to(tl.float32)
            tl.store(x_ptr + offs_m.to(tl.int64)[None, :] * stride_xm + offs_n[:, None],
                     acc.to(x_ptr.dtype.element_ty), mask=mask)
            tl.debug_barrier()
            tl.atomic_add(count_ptr + 2, 1, sem="release", scope="gpu")
    elif tile < n_o + n_a:
        c0 = (tile - n_o) * BLOCK_F
        offs_f = c0 + tl.arange(0, BLOCK_F)
        g_rows = wgu_ptr + offs_f.to(tl.int64)[:, None] * D
        u_rows = wgu_ptr + (F + offs_f).to(tl.int64)[:, None] * D
        wg = tl.load(g_rows + offs_kb[None, :], mask=(offs_kb < D)[None, :], other=0.0)
        wu = tl.load(u_rows + offs_kb[None, :], mask=(offs_kb < D)[None, :], other=0.0)
        if PRE_WAIT >= 2:
            wg1 = tl.load(g_rows + (offs_kb + BLOCK_K)[None, :], mask=(offs_kb + BLOCK_K < D)[None, :], other=0.0)
            wu1 = tl.load(u_rows + (offs_kb + BLOCK_K)[None, :], mask=(offs_kb + BLOCK_K < D)[None, :], other=0.0)
        if USE_PDL:
            tl.extra.cuda.gdc_wait()
        if HAS_O:
            _spin_until(count_ptr + 2, n_cb)
        sq = tl.zeros([BLOCK_M], tl.float32)
        xt, sq = _normed_tile(x_ptr, nw_ptr, offs_m, offs_kb, mask_m, D, stride_xm, sq, HAS_O)
        acc_g = _dot(wg, xt, tl.zeros([BLOCK_F, BLOCK_M], tl.float32), IEEE)
        acc_u = _dot(wu, xt, tl.zeros([BLOCK_F, BLOCK_M], tl.float32), IEEE)
        if PRE_WAIT >= 2:
            xt, sq = _normed_tile(x_ptr, nw_ptr, offs_m, offs_kb + BLOCK_K, mask_m, D, stride_xm, sq, HAS_O)
            acc_g = _dot(wg1, xt, acc_g, IEEE)
            acc_u = _dot(wu1, xt, acc_u, IEEE)
        for k0 in range(PRE_WAIT * BLOCK_K, D, BLOCK_K):
            ks = k0 + offs_kb
            wg = tl.load(g_rows + ks[None, :], mask=(ks < D)[None, :], other=0.0)
            wu = tl.load(u_rows + ks[None, :], mask=(ks < D)[None, :], other=0.0)
            xt, sq = _normed_tile(x_ptr, nw_ptr, offs_m, ks, mask_m, D, stride_xm, sq, HAS_O)
            acc_g = _dot(wg, xt, acc_g, IEEE)
            acc_u = _dot(wu, xt, acc_u, IEEE)
        # g and u rounded to the activations' dtype as the two-GEMM path stores them, then the gate.
        r = tl.rsqrt(sq / D + eps)[None, :]
        g = (acc_g * r).to(h_ptr.dtype.element_ty).to(tl.float32)
        u = (acc_u * r).to(h_ptr.dtype.element_ty).to(tl.float32)
        h = g / (1.0 + tl.exp(-g)) * u
        tl.store(h_ptr + offs_m.to(tl.int64)[None, :] * F + offs_f[:, None], h.to(h_ptr.dtype.element_ty),
                 mask=mask_m[None, :])
        tl.debug_barrier()
        tl.atomic_add(c_slices + c0 // K_SLICE, 1, sem="release", scope="gpu")
    else:
        b = tile - n_o - n_a
        s = b // n_cb
        cb = b % n_cb
        offs_n = cb * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < D
        k_start = s * K_SLICE
        d_rows = wd_ptr + offs_n.to(tl.int64)[:, None] * F + k_start
        w = tl.load(d_rows + offs_kb[None, :], mask=mask_n[:, None], other=0.0)
        if PRE_WAIT >= 2:
            w1 = tl.load(d_rows + (offs_kb + BLOCK_K)[None, :], mask=mask_n[:, None], other=0.0)
        if USE_PDL:
            tl.extra.cuda.gdc_wait()
        _spin_until(c_slices + s, K_SLICE // BLOCK_F)
        h_rows = h_ptr + offs_m.to(tl.int64)[:, None] * F + k_start
        ht = tl.load(h_rows + offs_kb[None, :], mask=mask_m[:, None], other=0.0, cache_modifier=".cg")
        acc = _dot(w, ht, tl.zeros([BLOCK_N, BLOCK_M], tl.float32), IEEE)
        if PRE_WAIT >= 2:
            ht = tl.load(h_rows + (offs_kb + BLOCK_K)[None, :], mask=mask_m[:, None], other=0.0, cache_modifier=".cg")
            acc = _dot(w1, ht, acc, IEEE)
        for k0 in range(PRE_WAIT * BLOCK_K, K_SLICE, BLOCK_K):
            w = tl.load(d_rows + (k0 + offs_kb)[None, :], mask=mask_n[:, None], other=0.0)
            ht = tl.load(h_rows + (k0 + offs_kb)[None, :], mask=mask_m[:, None], other=0.0, cache_modifier=".cg")
            acc = _dot(w, ht, acc, IEEE)
        mask = mask_n[:, None] & mask_m[None, :]
        tl.store(part_ptr + (s * BLOCK_M + offs_m)[None, :] * D + offs_n[:, None], acc, mask=mask)
        tl.debug_barrier()
        done = tl.atomic_add(c_down + cb, 1, sem="acq_rel", scope="gpu")
        if done == SPLIT - 1:
            # the last split of this column block sums them in split order (deterministic)
            acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
            for t in tl.static_range(SPLIT):
                acc += tl.load(part_ptr + (t * BLOCK_M + offs_m)[None, :] * D + offs_n[:, None], mask=mask,
                               other=0.0, cache_modifier=".cg")
            res_ptrs = res_ptr + offs_m.to(tl.int64)[None, :] * stride_rm + offs_n[:, None]
            if HAS_O:  # the residual is x, written by this launch
                res = tl.load(res_ptrs, mask=mask, other=0.0, cache_modifier=".cg")
            else:
                res = tl.load(res_ptrs, mask=mask, other=0.0)
            acc += res.to(tl.float32)
            tl.store(out_ptr + offs_m.to(tl.int64)[None, :] * stride_om + offs_n[:, None],
                     acc.to(out_ptr.dtype.element_ty), mask=mask)
    tl.debug_barrier()
    finished = tl.atomic_add(count_ptr + 1, 1, sem="acq_rel", scope="gpu")
    if finished == n_tiles - 1:
        tl.atomic_add(count_ptr, -n_tiles)
        offs_c = 1 + tl.arange(0, 1024)
        tl.store(count_ptr + offs_c, tl.zeros([1024], tl.int32), mask=offs_c < 3 + 2 * n_cb + SPLIT)


def ffn_counter_count(d: int, f: int, block_n: int, k_slice: int) -> int:
    """The int32 counters a launch of `launch_skinny_ffn` uses."""
    return 3 + 2 * triton.cdiv(d, block_n) + f // k_slice


def launch_skinny_ffn(x, w_gate_up, w_down, norm_weight, eps: float, residual, out, h, part, counters, *,
                      block_f: int, block_k: int, block_n: int, k_slice: int, num_warps: int, num_stages: int,
                      pdl: bool, pre_wait_tiles: int = 1, attn_out=None) -> None:
    """out[M, D] = residual + w_down @ silu(g) * u with [g | u] = rmsnorm(x) @ w_gate_up^T: x and
    residual [M, D], w_gate_up [2F, D] (gate rows then up rows), w_down [D, F], norm_weight [D],
    every last dim contiguous. Workspaces: h [BLOCK_M, F] in x's dtype, part fp32
    [F / k_slice * BLOCK_M * D], counters int32 [>= ffn_counter_count(...) + 1], zero (and left
    zero). F a multiple of k_slice, k_slice of block_f and of block_k (and at least
    `pre_wait_tiles` of those).

    `attn_out`: (a [M, Q], w_o [D, Q], layer_in [M, D], part_o fp32 [cdiv(Q, k_slice_o) * BLOCK_M * D],
    k_slice_o a multiple of block_k) - the output projection first, x = layer_in + a @ w_o^T written
    into `x` (then the FFN's input and `residual`: pass the same workspace for both)."""
    m, d, f = x.shape[0], x.shape[1], w_down.shape[1]
    block_m = max(16, triton.next_power_of_2(m))
    split = f // k_slice
    n_a, n_cb = f // block_f, triton.cdiv(d, block_n)
    if attn_out is not None:
        a, w_o, layer_in, part_o, k_slice_o = attn_out
        q = a.shape[1]
        split_o = triton.cdiv(q, k_slice_o)
        n_o = n_cb * split_o
    else:
        a = w_o = layer_in = part_o = x
        q, k_slice_o, split_o, n_o = 0, block_k, 1, 0
    _skinny_ffn_kernel[(n_o + n_a + n_cb * split,)](
        x, w_gate_up, w_down, norm_weight, residual, out, h, part, counters, a, w_o, layer_in, part_o,
        m, d, f, q, eps, x.stride(0), residual.stride(0), out.stride(0), a.stride(0), layer_in.stride(0), n_a, n_cb,
        BLOCK_M=block_m, BLOCK_F=block_f, BLOCK_K=block_k, BLOCK_N=block_n, K_SLICE=k_slice, SPLIT=split,
        K_SLICE_O=k_slice_o, SPLIT_O=split_o, HAS_O=attn_out is not None, IEEE=x.dtype.itemsize == 4,
        USE_PDL=pdl, PRE_WAIT=pre_wait_tiles, num_warps=num_warps, num_stages=num_stages,
        **({"launch_pdl": True} if pdl else {}),
    )
