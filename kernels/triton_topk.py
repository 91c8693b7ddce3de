"""Triton top-k of the CLSA indexer: scores over paged keys, then a radix select. No sort.

Scores become order-preserving 32-bit keys (`key = bits ^ ((bits >> 31) & 0x7FFFFFFF)` on the
float's bits: a larger float gives a larger signed key), read as a 16-bit high digit and two 8-bit
low digits.

1. `_score_kernel`, grid (B, chunks): the scores of a chunk of positions (each indexer key is read
   once), stored in fp32, and per row, by one atomic each per program: the largest digit, and a
   lower bound L of the k-th largest score - lane j of a block sees positions j, j + BLOCK_N, ...,
   groups of lanes are disjoint sets of positions, and with at least k non-empty groups in the
   row the smallest group maximum has at least k scores at or above it.
2. `_hist_kernel`, grid (B, chunks): one atomic increment into the row's 65,536-bin histogram of
   high digits for each score at or above L (typically a sixth of them; so many bins keep
   same-address atomics rare: a bin is 1/128 of an octave of score values).
3. `_select_kernel`, grid (B, chunks): each program finds the threshold digit T (where the count
   of larger scores reaches k) by scanning the histogram down from the largest digit (usually one
   window of 512 bins), then writes its scores above T to the output and compacts the few at T
   into a candidate list, reserving slots with one atomic per block of positions.
4. `_finish_kernel`, grid (B,): resolves the candidates with the two low digits (histograms of
   256 bins); exact ties at the very end fill in any order. A row of at most k positions has every
   position copied in step 3 and is padded with -1 here.

Output order is unspecified.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

HIST_BINS = 65536  # high 16 bits of the key
SCAN_BLOCK = 512  # histogram bins scanned per step (4 octaves of score values)
LOW_BINS = 256  # each of the two low 8-bit digits
# Per row: largest digit, winners, candidates, 65535 - lower-bound digit, lane groups seen,
# threshold digit, count above it.
META = 8


@triton.jit
def _order_key(scores):
    bits = scores.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _threshold(hist, offs, need):
    """The largest digit T with count(digit >= T) >= need, and count(digit > T)."""
    at_or_above = tl.sum(hist, axis=0) - tl.cumsum(hist, axis=0) + hist
    t = tl.max(tl.where(at_or_above >= need, offs, -1), axis=0)
    above = tl.sum(tl.where(offs > t, hist, 0), axis=0)
    return t, above


@triton.jit
def _find_threshold(hist_row_ptr, max_digit, k, SCAN: tl.constexpr):
    """Scan the high-digit histogram down from the row's largest digit, a window of SCAN bins at a
    time, until the count of scores reaches k: returns (T, count of scores with digit > T)."""
    offs = tl.arange(0, SCAN)
    base = max_digit - SCAN + 1
    higher = 0
    t_hi = -1
    above_hi = 0
    while t_hi < 0:
        bins = base + offs
        hist = tl.load(hist_row_ptr + bins, mask=bins >= 0, other=0)
        t, above = _threshold(hist, bins, k - higher)
        above_hi = tl.where(t >= 0, higher + above, above_hi)
        t_hi = t
        higher += tl.sum(hist, axis=0)
        base -= SCAN
    return t_hi, above_hi


@triton.jit
def _score_block(q, kidx_ptr, block_table_row, scores_row, pos, end, lane_max, stride_kr,
                 D: tl.constexpr, PAGE: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr):
    """Scores of positions `pos`, stored; returns the lane-wise running maximum digit (-1 where a
    lane has seen no position). Full blocks go unmasked (wide loads, no predicates); only a row's
    last block is masked."""
    offs_d = tl.arange(0, BLOCK_D)
    if MASKED:
        valid = pos < end
        blocks = tl.load(block_table_row + pos // PAGE, mask=valid, other=0)
        rows = (blocks * PAGE + pos % PAGE).to(tl.int64)
        keys = tl.load(kidx_ptr + rows[:, None] * stride_kr + offs_d[None, :],
                       mask=valid[:, None] & (offs_d[None, :] < D), other=0.0)
    else:
        blocks = tl.load(block_table_row + pos // PAGE)
        rows = (blocks * PAGE + pos % PAGE).to(tl.int64)
        if D == BLOCK_D:
            keys = tl.load(kidx_ptr + rows[:, None] * stride_kr + offs_d[None, :])
        else:
            keys = tl.load(kidx_ptr + rows[:, None] * stride_kr + offs_d[None, :],
                           mask=offs_d[None, :] < D, other=0.0)
    scores = tl.sum(keys.to(tl.float32) * q[None, :], axis=1)
    digit = (_order_key(scores) >> 16) + 32768
    if MASKED:
        tl.store(scores_row + pos, scores, mask=valid)
        return tl.maximum(lane_max, tl.where(valid, digit, -1))
    else:
        tl.store(scores_row + pos, scores)
        return tl.maximum(lane_max, digit)


@triton.jit
def _score_kernel(
    q_ptr, kidx_ptr, block_table_ptr, seq_lens_ptr, scores_ptr, meta_ptr,
    k, chunk_size, stride_qb, stride_kr, stride_btb, stride_sb, stride_mb,
    D: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, GROUP: tl.constexpr,
):
    b = tl.program_id(0)
    start = tl.program_id(1) * chunk_size
    seq_len = tl.load(seq_lens_ptr + b)
    if (seq_len > k) & (start < seq_len):
        offs_d = tl.arange(0, BLOCK_D)
        q = tl.load(q_ptr + b * stride_qb + offs_d, mask=offs_d < D, other=0.0).to(tl.float32)
        end = tl.minimum(start + chunk_size, seq_len)
        full_end = start + (end - start) // BLOCK_N * BLOCK_N
        block_table_row = block_table_ptr + b * stride_btb
        scores_row = scores_ptr + b * stride_sb
        # Lane j of the block sees positions start + j, start + j + BLOCK_N, ...: its running max
        # is elementwise (no reduction inside the loop).
        lane_max = tl.full([BLOCK_N], -1, tl.int32)
        for n0 in range(start, full_end, BLOCK_N):
            lane_max = _score_block(q, kidx_ptr, block_table_row, scores_row, n0 + tl.arange(0, BLOCK_N), end,
                                    lane_max, stride_kr, D, PAGE, BLOCK_D, False)
        if full_end < end:
            lane_max = _score_block(q, kidx_ptr, block_table_row, scores_row, full_end + tl.arange(0, BLOCK_N),
                                    end, lane_max, stride_kr, D, PAGE, BLOCK_D, True)
        meta_row = meta_ptr + b * stride_mb
        tl.atomic_max(meta_row, tl.max(lane_max, axis=0), sem="relaxed")
        # Groups of GROUP lanes are disjoint sets of positions; the maxima of k non-empty groups
        # are k distinct scores, so the smallest group maximum bounds the threshold from below.
        group_max = tl.max(tl.reshape(lane_max, (BLOCK_N // GROUP, GROUP)), axis=1)
        filled = group_max >= 0
        tl.atomic_add(meta_row + 4, tl.sum(filled.to(tl.int32), axis=0), sem="relaxed")
        # Stored as 65535 - bound so that zeroed memory means "no bound yet".
        tl.atomic_max(meta_row + 3, 65535 - tl.min(tl.where(filled, group_max, 65535), axis=0), sem="relaxed")


@triton.jit
def _hist_kernel(
    scores_ptr, hist_ptr, meta_ptr, seq_lens_ptr, k, chunk_size, stride_sb, stride_hb, stride_mb,
    BLOCK_N: tl.constexpr,
):
    b = tl.program_id(0)
    start = tl.program_id(1) * chunk_size
    seq_len = tl.load(seq_lens_ptr + b)
    if (seq_len > k) & (start < seq_len):
        meta_row = meta_ptr + b * stride_mb
        bound = tl.where(tl.load(meta_row + 4) >= k, 65535 - tl.load(meta_row + 3), 0)
        end = tl.minimum(start + chunk_size, seq_len)
        for n0 in range(start, end, BLOCK_N):
            pos = n0 + tl.arange(0, BLOCK_N)
            valid = pos < end
            digit = (_order_key(tl.load(scores_ptr + b * stride_sb + pos, mask=valid, other=0.0)) >> 16) + 32768
            tl.atomic_add(hist_ptr + b * stride_hb + digit, 1, mask=valid & (digit >= bound), sem="relaxed")


@triton.jit
def _select_kernel(
    scores_ptr, hist_ptr, meta_ptr, cand_ptr, out_ptr, seq_lens_ptr,
    k, chunk_size, stride_sb, stride_hb, stride_mb, stride_cb, stride_ob,
    BLOCK_N: tl.constexpr, SCAN: tl.constexpr,
):
    b = tl.program_id(0)
    start = tl.program_id(1) * chunk_size
    seq_len = tl.load(seq_lens_ptr + b)
    end = tl.minimum(start + chunk_size, seq_len)
    out_row = out_ptr + b * stride_ob
    if seq_len <= k:
        for n0 in range(start, end, BLOCK_N):  # every position is selected: it takes its own slot
            pos = n0 + tl.arange(0, BLOCK_N)
            tl.store(out_row + pos, pos, mask=pos < end)
    elif start < seq_len:
        t_hi, above_hi = _find_threshold(hist_ptr + b * stride_hb, tl.load(meta_ptr + b * stride_mb), k, SCAN)
        if tl.program_id(1) == 0:  # for the finishing kernel
            tl.store(meta_ptr + b * stride_mb + 5, t_hi)
            tl.store(meta_ptr + b * stride_mb + 6, above_hi)
        for n0 in range(start, end, BLOCK_N):
            pos = n0 + tl.arange(0, BLOCK_N)
            valid = pos < end
            digit = (_order_key(tl.load(scores_ptr + b * stride_sb + pos, mask=valid, other=0.0)) >> 16) + 32768
            win = valid & (digit > t_hi)
            n_win = tl.sum(win.to(tl.int32), axis=0)
            if n_win > 0:
                base = tl.atomic_add(meta_ptr + b * stride_mb + 1, n_win, sem="relaxed")
                tl.store(out_row + base + tl.cumsum(win.to(tl.int32), axis=0) - 1, pos, mask=win)
            cand = valid & (digit == t_hi)
            n_cand = tl.sum(cand.to(tl.int32), axis=0)
            if n_cand > 0:
                base = tl.atomic_add(meta_ptr + b * stride_mb + 2, n_cand, sem="relaxed")
                tl.store(cand_ptr + b * stride_cb + base + tl.cumsum(cand.to(tl.int32), axis=0) - 1, pos,
                         mask=cand)


@triton.jit
def _candidates(cand_row, scores_row, n0, n_cand, BLOCK_N: tl.constexpr):
    """Candidates n0 .. n0 + BLOCK_N of a row: (positions, order keys, valid mask)."""
    j = n0 + tl.arange(0, BLOCK_N)
    valid = j < n_cand
    pos = tl.load(cand_row + j, mask=valid, other=0)
    return pos, _order_key(tl.load(scores_row + pos, mask=valid, other=0.0)), valid


@triton.jit
def _finish_kernel(
    scores_ptr, meta_ptr, cand_ptr, out_ptr, seq_lens_ptr,
    k, stride_sb, stride_mb, stride_cb, stride_ob,
    BLOCK_N: tl.constexpr, BINS: tl.constexpr,
):
    b = tl.program_id(0)
    seq_len = tl.load(seq_lens_ptr + b)
    out_row = out_ptr + b * stride_ob
    if seq_len <= k:
        for n0 in range(seq_len, k, BLOCK_N):
            slot = n0 + tl.arange(0, BLOCK_N)
            tl.store(out_row + slot, tl.full([BLOCK_N], -1, tl.int32), mask=slot < k)
    else:
        # The scores above T already hold slots [0, above_hi); resolve the candidates (digit == T)
        # on the two low digits.
        above_hi = tl.load(meta_ptr + b * stride_mb + 6)
        n_cand = tl.load(meta_ptr + b * stride_mb + 2)
        written = above_hi
        need = k - above_hi
        offs_bins = tl.arange(0, BINS)
        hist_mid = tl.zeros([BINS], tl.int32)
        for n0 in range(0, n_cand, BLOCK_N):
            pos, key, valid = _candidates(cand_ptr + b * stride_cb, scores_ptr + b * stride_sb, n0, n_cand, BLOCK_N)
            hist_mid += tl.histogram((key >> 8) & 0xFF, BINS, mask=valid)
        t_mid, above_mid = _threshold(hist_mid, offs_bins, need)
        hist_lo = tl.zeros([BINS], tl.int32)
        for n0 in range(0, n_cand, BLOCK_N):
            pos, key, valid = _candidates(cand_ptr + b * stride_cb, scores_ptr + b * stride_sb, n0, n_cand, BLOCK_N)
            mid = (key >> 8) & 0xFF
            win = valid & (mid > t_mid)
            tl.store(out_row + written + tl.cumsum(win.to(tl.int32), axis=0) - 1, pos, mask=win)
            written += tl.sum(win.to(tl.int32), axis=0)
            hist_lo += tl.histogram(key & 0xFF, BINS, mask=valid & (mid == t_mid))
        t_lo, above_lo = _threshold(hist_lo, offs_bins, need - above_mid)
        ties_left = need - above_mid - above_lo  # equal keys at the very end: take any of them
        for n0 in range(0, n_cand, BLOCK_N):
            pos, key, valid = _candidates(cand_ptr + b * stride_cb, scores_ptr + b * stride_sb, n0, n_cand, BLOCK_N)
            at_mid = valid & (((key >> 8) & 0xFF) == t_mid)
            win = at_mid & ((key & 0xFF) > t_lo)
            tie = at_mid & ((key & 0xFF) == t_lo)
            tie = tie & (tl.cumsum(tie.to(tl.int32), axis=0) <= ties_left)
            take = win | tie
            tl.store(out_row + written + tl.cumsum(take.to(tl.int32), axis=0) - 1, pos, mask=take)
            written += tl.sum(take.to(tl.int32), axis=0)
            ties_left -= tl.sum(tie.to(tl.int32), axis=0)


def launch_index_topk(q_idx: torch.Tensor, k_idx_cache: torch.Tensor, block_table: torch.Tensor,
                      seq_lens: torch.Tensor, k: int, out: torch.Tensor, chunk_size: int, block_n: int,
                      num_warps: int, finish_block: int, finish_warps: int) -> None:
    """Writes the top-k positions of every row into `out` [B, k] int32. `chunk_size` positions per
    program of the three chunked kernels (a multiple of block_n)."""
    batch, index_dim = q_idx.shape
    page = k_idx_cache.shape[1]
    max_len = block_table.shape[1] * page
    device = q_idx.device
    scores = torch.empty((batch, max_len), dtype=torch.float32, device=device)
    candidates = torch.empty((batch, max_len), dtype=torch.int32, device=device)
    # One zeroed buffer (one memset): the histogram, then the row's META counters.
    counters = torch.zeros((batch, HIST_BINS + META), dtype=torch.int32, device=device)
    hist, meta = counters[:, :HIST_BINS], counters[:, HIST_BINS:]
    grid = (batch, -(-max_len // chunk_size))
    # Lane groups small enough that a full row has at least k of them (a bound needs k).
    group = min(block_n, 1 << max(0, (grid[1] * block_n // k).bit_length() - 1))
    sweep_block = min(finish_block, triton.next_power_of_2(chunk_size))
    _score_kernel[grid](
        q_idx, k_idx_cache, block_table, seq_lens, scores, meta,
        k, chunk_size, q_idx.stride(0), k_idx_cache.stride(1), block_table.stride(0), scores.stride(0),
        counters.stride(0),
        D=index_dim, PAGE=page, BLOCK_N=block_n, BLOCK_D=triton.next_power_of_2(index_dim), GROUP=group,
        num_warps=num_warps,
    )
    _hist_kernel[grid](
        scores, hist, meta, seq_lens, k, chunk_size, scores.stride(0), counters.stride(0), counters.stride(0),
        BLOCK_N=sweep_block, num_warps=num_warps,
    )
    _select_kernel[grid](
        scores, hist, meta, candidates, out, seq_lens,
        k, chunk_size, scores.stride(0), counters.stride(0), counters.stride(0), candidates.stride(0),
        out.stride(0), BLOCK_N=sweep_block, SCAN=SCAN_BLOCK, num_warps=num_warps,
    )
    _finish_kernel[(batch,)](
        scores, meta, candidates, out, seq_lens,
        k, scores.stride(0), counters.stride(0), candidates.stride(0), out.stride(0),
        BLOCK_N=finish_block, BINS=LOW_BINS, num_warps=finish_warps,
    )
