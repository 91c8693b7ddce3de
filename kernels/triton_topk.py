"""Triton top-k of the CLSA indexer: scores over paged keys, then a 3-level radix select.

No sort anywhere. Scores become order-preserving 32-bit keys (`key = bits ^ ((bits >> 31) &
0x7FFFFFFF)` on the float's bits: a larger float gives a larger signed key), split into three
digits of 11, 11 and 10 bits.

1. `_score_hist_kernel`, grid (B, chunks): scores of a chunk of positions (each indexer key read
   once), stored in fp32, and a histogram of the top digit added into the row's `hist1`.
2. `_select_kernel`, grid (B, chunks): every program finds the threshold digit T1 of its row from
   `hist1` (the digit where the count of larger scores reaches k); scores above it are selected
   outright, scores in it become candidates (positions compacted into a buffer) and feed `hist2`
   with their middle digit.
3. `_finish_kernel`, grid (B,): one program per row resolves the candidates with `hist2` and then
   the low digit, writes the remaining winners (exact ties at the very end fill in any order) and
   pads with -1 when the row has fewer than k positions.

Rows with at most k positions skip the select and copy every position. Output order is
unspecified. Each score is written once and read once or twice; candidates are few (a thin slice
of the score distribution) unless many scores are equal.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BINS_HI = 2048  # top 11 bits
BINS_MID = 2048  # next 11 bits
BINS_LO = 1024  # last 10 bits


@triton.jit
def _order_key(scores):
    bits = scores.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _threshold(hist, offs, need):
    """The largest digit T with count(digit >= T) >= need, and count(digit > T)."""
    total = tl.sum(hist, axis=0)
    at_or_above = total - tl.cumsum(hist, axis=0) + hist
    t = tl.max(tl.where(at_or_above >= need, offs, -1), axis=0)
    above = tl.sum(tl.where(offs > t, hist, 0), axis=0)
    return t, above


@triton.jit
def _score_hist_kernel(
    q_ptr, kidx_ptr, block_table_ptr, seq_lens_ptr, scores_ptr, hist1_ptr,
    k, chunk_size, stride_qb, stride_kr, stride_btb, stride_sb, stride_hb,
    D: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BINS: tl.constexpr,
):
    b = tl.program_id(0)
    start = tl.program_id(1) * chunk_size
    seq_len = tl.load(seq_lens_ptr + b)
    if (seq_len > k) & (start < seq_len):
        offs_d = tl.arange(0, BLOCK_D)
        q = tl.load(q_ptr + b * stride_qb + offs_d, mask=offs_d < D, other=0.0).to(tl.float32)
        hist = tl.zeros([BINS], tl.int32)
        end = tl.minimum(start + chunk_size, seq_len)
        for n0 in range(start, end, BLOCK_N):
            pos = n0 + tl.arange(0, BLOCK_N)
            valid = pos < end
            blocks = tl.load(block_table_ptr + b * stride_btb + pos // PAGE, mask=valid, other=0)
            rows = (blocks * PAGE + pos % PAGE).to(tl.int64)
            keys = tl.load(kidx_ptr + rows[:, None] * stride_kr + offs_d[None, :],
                           mask=valid[:, None] & (offs_d[None, :] < D), other=0.0)
            scores = tl.sum(keys.to(tl.float32) * q[None, :], axis=1)
            tl.store(scores_ptr + b * stride_sb + pos, scores, mask=valid)
            digit = (_order_key(scores) >> 21) + 1024
            hist += tl.histogram(digit, BINS, mask=valid)
        offs_bins = tl.arange(0, BINS)
        tl.atomic_add(hist1_ptr + b * stride_hb + offs_bins, hist, mask=hist > 0)


@triton.jit
def _select_kernel(
    scores_ptr, hist1_ptr, hist2_ptr, counts_ptr, cand_ptr, out_ptr, seq_lens_ptr,
    k, chunk_size, stride_sb, stride_hb, stride_cb, stride_ob,
    BLOCK_N: tl.constexpr, BINS: tl.constexpr,
):
    b = tl.program_id(0)
    start = tl.program_id(1) * chunk_size
    seq_len = tl.load(seq_lens_ptr + b)
    end = tl.minimum(start + chunk_size, seq_len)
    if seq_len <= k:
        # Every position is selected: it goes to its own slot.
        for n0 in range(start, end, BLOCK_N):
            pos = n0 + tl.arange(0, BLOCK_N)
            tl.store(out_ptr + b * stride_ob + pos, pos, mask=pos < end)
    elif start < seq_len:
        offs_bins = tl.arange(0, BINS)
        t1, above1 = _threshold(tl.load(hist1_ptr + b * stride_hb + offs_bins), offs_bins, k)
        hist = tl.zeros([BINS], tl.int32)
        for n0 in range(start, end, BLOCK_N):
            pos = n0 + tl.arange(0, BLOCK_N)
            valid = pos < end
            key = _order_key(tl.load(scores_ptr + b * stride_sb + pos, mask=valid, other=0.0))
            digit = (key >> 21) + 1024
            win = valid & (digit > t1)
            n_win = tl.sum(win.to(tl.int32), axis=0)
            if n_win > 0:
                base = tl.atomic_add(counts_ptr + b * 2, n_win)
                slot = base + tl.cumsum(win.to(tl.int32), axis=0) - 1
                tl.store(out_ptr + b * stride_ob + slot, pos, mask=win)
            cand = valid & (digit == t1)
            n_cand = tl.sum(cand.to(tl.int32), axis=0)
            if n_cand > 0:
                base = tl.atomic_add(counts_ptr + b * 2 + 1, n_cand)
                slot = base + tl.cumsum(cand.to(tl.int32), axis=0) - 1
                tl.store(cand_ptr + b * stride_cb + slot, pos, mask=cand)
                hist += tl.histogram((key >> 10) & 0x7FF, BINS, mask=cand)
        tl.atomic_add(hist2_ptr + b * stride_hb + offs_bins, hist, mask=hist > 0)


@triton.jit
def _finish_kernel(
    scores_ptr, hist1_ptr, hist2_ptr, counts_ptr, cand_ptr, out_ptr, seq_lens_ptr,
    k, stride_sb, stride_hb, stride_cb, stride_ob,
    BLOCK_N: tl.constexpr, BINS: tl.constexpr, BINS_LO: tl.constexpr,
):
    b = tl.program_id(0)
    seq_len = tl.load(seq_lens_ptr + b)
    if seq_len <= k:
        for n0 in range(seq_len, k, BLOCK_N):
            slot = n0 + tl.arange(0, BLOCK_N)
            tl.store(out_ptr + b * stride_ob + slot, tl.full([BLOCK_N], -1, tl.int32), mask=slot < k)
    else:
        offs_bins = tl.arange(0, BINS)
        t1, above1 = _threshold(tl.load(hist1_ptr + b * stride_hb + offs_bins), offs_bins, k)
        need = k - above1
        t2, above2 = _threshold(tl.load(hist2_ptr + b * stride_hb + offs_bins), offs_bins, need)
        n_cand = tl.load(counts_ptr + b * 2 + 1)
        # Pass 1: candidates above T2 win; those at T2 feed the low-digit histogram.
        written = above1
        offs_lo = tl.arange(0, BINS_LO)
        hist3 = tl.zeros([BINS_LO], tl.int32)
        for n0 in range(0, n_cand, BLOCK_N):
            j = n0 + tl.arange(0, BLOCK_N)
            valid = j < n_cand
            pos = tl.load(cand_ptr + b * stride_cb + j, mask=valid, other=0)
            key = _order_key(tl.load(scores_ptr + b * stride_sb + pos, mask=valid, other=0.0))
            mid = (key >> 10) & 0x7FF
            win = valid & (mid > t2)
            slot = written + tl.cumsum(win.to(tl.int32), axis=0) - 1
            tl.store(out_ptr + b * stride_ob + slot, pos, mask=win)
            written += tl.sum(win.to(tl.int32), axis=0)
            hist3 += tl.histogram(key & 0x3FF, BINS_LO, mask=valid & (mid == t2))
        t3, above3 = _threshold(hist3, offs_lo, need - above2)
        ties_left = need - above2 - above3  # exact ties at the last digit: take any of them
        # Pass 2: among candidates at T2, low digits above T3 win, then ties up to the count.
        for n0 in range(0, n_cand, BLOCK_N):
            j = n0 + tl.arange(0, BLOCK_N)
            valid = j < n_cand
            pos = tl.load(cand_ptr + b * stride_cb + j, mask=valid, other=0)
            key = _order_key(tl.load(scores_ptr + b * stride_sb + pos, mask=valid, other=0.0))
            at_t2 = valid & (((key >> 10) & 0x7FF) == t2)
            lo = key & 0x3FF
            win = at_t2 & (lo > t3)
            tie = at_t2 & (lo == t3)
            tie_rank = tl.cumsum(tie.to(tl.int32), axis=0)
            tie = tie & (tie_rank <= ties_left)
            take = win | tie
            slot = written + tl.cumsum(take.to(tl.int32), axis=0) - 1
            tl.store(out_ptr + b * stride_ob + slot, pos, mask=take)
            written += tl.sum(take.to(tl.int32), axis=0)
            ties_left -= tl.sum(tie.to(tl.int32), axis=0)


def launch_index_topk(q_idx: torch.Tensor, k_idx_cache: torch.Tensor, block_table: torch.Tensor,
                      seq_lens: torch.Tensor, k: int, out: torch.Tensor, chunk_size: int, block_n: int,
                      num_warps: int) -> None:
    """Writes the top-k positions of every row into `out` [B, k] int32. `chunk_size` positions per
    program of the two chunked kernels (a multiple of block_n)."""
    batch, index_dim = q_idx.shape
    page = k_idx_cache.shape[1]
    max_len = block_table.shape[1] * page
    n_chunks = -(-max_len // chunk_size)
    scores = torch.empty((batch, max_len), dtype=torch.float32, device=q_idx.device)
    candidates = torch.empty((batch, max_len), dtype=torch.int32, device=q_idx.device)
    counters = torch.zeros((batch, BINS_HI + BINS_MID + 2), dtype=torch.int32, device=q_idx.device)
    hist1 = counters[:, :BINS_HI]
    hist2 = counters[:, BINS_HI : BINS_HI + BINS_MID]
    counts = counters[:, BINS_HI + BINS_MID :]
    _score_hist_kernel[(batch, n_chunks)](
        q_idx, k_idx_cache, block_table, seq_lens, scores, hist1,
        k, chunk_size, q_idx.stride(0), k_idx_cache.stride(1), block_table.stride(0), scores.stride(0),
        counters.stride(0),
        D=index_dim, PAGE=page, BLOCK_N=block_n, BLOCK_D=triton.next_power_of_2(index_dim), BINS=BINS_HI,
        num_warps=num_warps,
    )
    _select_kernel[(batch, n_chunks)](
        scores, hist1, hist2, counts, candidates, out, seq_lens,
        k, chunk_size, scores.stride(0), counters.stride(0), candidates.stride(0), out.stride(0),
        BLOCK_N=block_n, BINS=BINS_HI, num_warps=num_warps,
    )
    _finish_kernel[(batch,)](
        scores, hist1, hist2, counts, candidates, out, seq_lens,
        k, scores.stride(0), counters.stride(0), candidates.stride(0), out.stride(0),
        BLOCK_N=block_n, BINS=BINS_MID, BINS_LO=BINS_LO, num_warps=num_warps,
    )
