"""Triton top-k of the CLSA indexer: scores over paged keys, then a radix select. No sort.

Scores become order-preserving 32-bit keys (`key = bits ^ ((bits >> 31) & 0x7FFFFFFF)` on the
float's bits: a larger float gives a larger signed key), read as a 16-bit high digit and two 8-bit
low digits. Each row (sequence) is worked on by G programs ("members"), each owning a contiguous
chunk of positions, in four phases:

1. score: the chunk's scores (each indexer key read once; the next block's keys are in flight
   while one block is scored), stored in fp32. Lane j of a block sees positions j, j + BLOCK_N,
   ... of a sub-chunk, so lane-wise running maxima cost nothing; each lane maximum of a sub-chunk
   goes into the row's coarse histogram of the top 12 key bits. Lanes are disjoint sets of
   positions: if at least k lane maxima lie in coarse bins >= c, at least k scores do, so every
   top-k score lies in a bin >= c.
2. hist: each member finds that bin c (scanning the coarse histogram down until the count of lane
   maxima reaches k) and adds its scores in bins >= c - about 2% of them for Gaussian-like
   scores - to the row's 65,536-bin histogram of high digits, one atomic each.
3. select: the threshold digit T (where the count of larger scores reaches k) by a scan down
   from the row's largest digit, a window of SCAN bins at a time (usually one); scores above T go
   to the output and the few at T (~90 for 128K positions and k = 2,048) into a candidate list,
   one atomic per block reserving slots.
4. finish, one program per row: up to RANK_BLOCK candidates are sorted in registers (key and
   position packed in an int64), more are resolved by a radix select on the two low 8-bit
   digits; exact ties fill in any order. A row of at most k positions is copied whole and
   padded with -1. It then zeroes the histogram bins and counters the row touched, so the
   workspace is all zeros again for the next call (no memset launch).

Cooperative mode runs the four phases in ONE launch: B x G programs all resident at once (a
cooperative launch, sized to fit), the members of a row meet at two barriers (an atomic counter
they spin on) and the last one through phase 3 runs phase 4. Otherwise (more rows than fit, or
the interpreter, which runs programs one by one) each phase is its own launch over the same code.
No device-to-host sync either way.

Output order is unspecified.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._backend import interpreting

HIST_BINS = 65536  # high 16 bits of the key
COARSE_BINS = 4096  # high 12 bits: the histogram of lane maxima
SCAN_BLOCK = 512  # bins scanned per step
LOW_BINS = 256  # each of the two low 8-bit digits
RANK_BLOCK = 128  # candidates at the threshold digit resolved by a sort in registers (else by digits)
FINISH_BLOCK = 1024
SWEEP_BLOCK = 512  # scores per step of the histogram phase (1,024 spilled 8 B at 128 registers)
SWEEP_PREFETCH = True  # the histogram phase's next block in flight, for chunks of more than one block
# Per-row counters after the two histograms. Slots: 0 largest digit, 1 winners, 2 candidates,
# 3 65535 - smallest lane-maximum digit, 4 lane maxima published, 6 count above the threshold
# digit, 7 barrier arrivals, 8 members done, 9 the histogram's lower bound.
META = 16
ROW_WORDS = HIST_BINS + COARSE_BINS + META


@triton.jit
def _order_key(scores):
    bits = scores.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _digit(scores):
    """The high 16 bits of the order key as 0..65535."""
    return (_order_key(scores) >> 16) + 32768


@triton.jit
def _threshold(hist, offs, need):
    """The largest digit T with count(digit >= T) >= need, and count(digit > T)."""
    at_or_above = tl.sum(hist, axis=0) - tl.cumsum(hist, axis=0) + hist
    t = tl.max(tl.where(at_or_above >= need, offs, -1), axis=0)
    above = tl.sum(tl.where(offs > t, hist, 0), axis=0)
    return t, above


@triton.jit
def _find_threshold(hist_row_ptr, max_digit, k, SCAN: tl.constexpr):
    """Scan a histogram down from `max_digit`, a window of SCAN bins at a time, until the count
    reaches k: returns (T, count with digit > T). The histogram must hold at least k counts."""
    offs = tl.arange(0, SCAN)
    base = max_digit - SCAN + 1
    higher = 0
    t_hi = -1
    above_hi = 0
    while t_hi < 0:
        bins = base + offs
        hist = tl.load(hist_row_ptr + bins, mask=bins >= 0, other=0, cache_modifier=".cg")
        t, above = _threshold(hist, bins, k - higher)
        above_hi = tl.where(t >= 0, higher + above, above_hi)
        t_hi = t
        higher += tl.sum(hist, axis=0)
        base -= SCAN
    return t_hi, above_hi


@triton.jit
def _arrive_and_wait(counter_ptr, target):
    """Barrier of a row's members: count this program in, spin until `target` have arrived.
    Release/acquire at GPU scope make every member's earlier stores visible after it. (Spinning
    on plain volatile loads, then one acquiring atomic, measured 2 us slower on the H200.)"""
    tl.debug_barrier()
    seen = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu") + 1
    while seen < target:
        seen = tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()


@triton.jit
def _score_block(q, kidx_ptr, block_table_row, scores_row, pos, end, lane_max, stride_kr,
                 D: tl.constexpr, PAGE: tl.constexpr, BLOCK_D: tl.constexpr):
    """Scores of the positions `pos` below `end` (a row's partial last block), stored; returns the
    lane-wise running maximum digit (-1 where a lane has seen no position)."""
    offs_d = tl.arange(0, BLOCK_D)
    valid = pos < end
    blocks = tl.load(block_table_row + pos // PAGE, mask=valid, other=0)
    rows = (blocks * PAGE + pos % PAGE).to(tl.int64)
    keys = tl.load(kidx_ptr + rows[:, None] * stride_kr + offs_d[None, :],
                   mask=valid[:, None] & (offs_d[None, :] < D), other=0.0)
    scores = tl.sum(keys.to(tl.float32) * q[None, :], axis=1)
    tl.store(scores_row + pos, scores, mask=valid)
    return tl.maximum(lane_max, tl.where(valid, _digit(scores), -1))


@triton.jit
def _publish_lanes(coarse_row, meta_row, lane_max):
    """Lane maxima of one sub-chunk into the coarse histogram; the count, the largest and the
    smallest digit into the row's counters."""
    seen = lane_max >= 0
    tl.atomic_add(coarse_row + (tl.where(seen, lane_max, 0) >> 4), 1, mask=seen, sem="relaxed")
    tl.atomic_add(meta_row + 4, tl.sum(seen.to(tl.int32), axis=0), sem="relaxed")
    tl.atomic_max(meta_row, tl.max(lane_max, axis=0), sem="relaxed")
    tl.atomic_max(meta_row + 3, 65535 - tl.min(tl.where(seen, lane_max, 65535), axis=0), sem="relaxed")


@triton.jit
def _block_rows(block_table_row, pos, PAGE: tl.constexpr):
    """Physical cache rows of positions `pos` (all valid), int32 while they wait in registers."""
    return tl.load(block_table_row + pos // PAGE) * PAGE + pos % PAGE


@triton.jit
def _keys_at(kidx_ptr, rows, stride_kr, D: tl.constexpr, BLOCK_D: tl.constexpr):
    """Indexer keys of physical rows `rows`, all valid (unmasked, wide loads)."""
    offs_d = tl.arange(0, BLOCK_D)
    ptrs = kidx_ptr + rows.to(tl.int64)[:, None] * stride_kr + offs_d[None, :]
    if D == BLOCK_D:
        return tl.load(ptrs)
    else:
        return tl.load(ptrs, mask=offs_d[None, :] < D, other=0.0)


@triton.jit
def _score_full(keys, q, scores_row, start, i, n_full, per_sub, lane_max, coarse_row, meta_row,
                BLOCK_N: tl.constexpr):
    """Score full block i of the chunk at `start`, store it, fold it into the lane maxima; publish
    them at a sub-chunk's end (every per_sub blocks, and after the last)."""
    n0 = start + i * BLOCK_N
    flush = ((i + 1) % per_sub == 0) | (i == n_full - 1)
    scores = tl.sum(keys.to(tl.float32) * q[None, :], axis=1)
    tl.store(scores_row + n0 + tl.arange(0, BLOCK_N), scores)
    lane_max = tl.maximum(lane_max, _digit(scores))
    if flush:
        _publish_lanes(coarse_row, meta_row, lane_max)
    return tl.where(flush, -1, lane_max)


@triton.jit
def _score_phase(q_row, kidx_ptr, block_table_row, scores_row, coarse_row, meta_row, start, end, sub_chunk,
                 stride_kr, D: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                 AHEAD: tl.constexpr):
    """Scores of positions start .. end, stored, with the lane maxima of every sub-chunk published.

    The loop over the full blocks keeps AHEAD (1 or 2) later blocks' keys in flight while a block
    is scored, and the block-table entries of the block after those, so that a block's key load
    never waits for its own table lookup (blocks past the last are clamped to it: fetched twice
    rather than masked). A partial last block is masked."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = tl.load(q_row + offs_d, mask=offs_d < D, other=0.0).to(tl.float32)
    full_end = start + (end - start) // BLOCK_N * BLOCK_N
    n_full = (full_end - start) // BLOCK_N
    per_sub = sub_chunk // BLOCK_N
    last = full_end - BLOCK_N
    lane_max = tl.full([BLOCK_N], -1, tl.int32)
    if n_full > 0:
        keys = _keys_at(kidx_ptr, _block_rows(block_table_row, start + offs_n, PAGE), stride_kr, D, BLOCK_D)
        if AHEAD == 1:
            rows_next = _block_rows(block_table_row, tl.minimum(start + BLOCK_N, last) + offs_n, PAGE)
            for i in range(0, n_full):
                keys_next = _keys_at(kidx_ptr, rows_next, stride_kr, D, BLOCK_D)
                rows_next = _block_rows(block_table_row, tl.minimum(start + (i + 2) * BLOCK_N, last) + offs_n, PAGE)
                lane_max = _score_full(keys, q, scores_row, start, i, n_full, per_sub, lane_max, coarse_row,
                                       meta_row, BLOCK_N)
                keys = keys_next
        else:
            keys_1 = _keys_at(kidx_ptr, _block_rows(block_table_row, tl.minimum(start + BLOCK_N, last) + offs_n, PAGE),
                              stride_kr, D, BLOCK_D)
            rows_next = _block_rows(block_table_row, tl.minimum(start + 2 * BLOCK_N, last) + offs_n, PAGE)
            for i in range(0, n_full):
                keys_2 = _keys_at(kidx_ptr, rows_next, stride_kr, D, BLOCK_D)
                rows_next = _block_rows(block_table_row, tl.minimum(start + (i + 3) * BLOCK_N, last) + offs_n, PAGE)
                lane_max = _score_full(keys, q, scores_row, start, i, n_full, per_sub, lane_max, coarse_row,
                                       meta_row, BLOCK_N)
                keys = keys_1
                keys_1 = keys_2
    if full_end < end:
        lane_max = _score_block(q, kidx_ptr, block_table_row, scores_row, full_end + offs_n, end,
                                tl.full([BLOCK_N], -1, tl.int32), stride_kr, D, PAGE, BLOCK_D)
        _publish_lanes(coarse_row, meta_row, lane_max)


@triton.jit
def _row_bound(coarse_row, meta_row, k, SCAN: tl.constexpr):
    """The smallest digit a top-k score can have: the lower edge of the coarse bin where the count
    of lane maxima reaches k (0 when fewer than k lane maxima were published)."""
    if tl.load(meta_row + 4, cache_modifier=".cg") >= k:
        c, _ = _find_threshold(coarse_row, tl.load(meta_row, cache_modifier=".cg") >> 4, k, SCAN)
        bound = c << 4
    else:
        bound = 0
    return bound


@triton.jit
def _hist_phase(scores_row, hist_row, kept_ptr, bound, start, end, BLOCK: tl.constexpr, AHEAD: tl.constexpr):
    """One atomic increment into the row's 16-bit digit histogram per score at or above the bound;
    those positions are also kept, in order, at kept_ptr (this member's own stretch of the list).
    Returns how many were kept. AHEAD (chunks of more than one block): the next block's scores are
    in flight while a block is counted (a member of a B=32 row sweeps 16 blocks, one L2 round trip
    each unless they overlap)."""
    n_kept = 0
    offs = tl.arange(0, BLOCK)
    if AHEAD:
        scores = tl.load(scores_row + start + offs, mask=start + offs < end, other=0.0)
    for n0 in range(start, end, BLOCK):
        pos = n0 + offs
        valid = pos < end
        if AHEAD:
            ahead = pos + BLOCK
            scores_next = tl.load(scores_row + ahead, mask=ahead < end, other=0.0)
            digit = _digit(scores)
            scores = scores_next
        else:
            digit = _digit(tl.load(scores_row + pos, mask=valid, other=0.0))
        keep = valid & (digit >= bound)
        tl.atomic_add(hist_row + digit, 1, mask=keep, sem="relaxed")
        tl.store(kept_ptr + n_kept + tl.cumsum(keep.to(tl.int32), axis=0) - 1, pos, mask=keep)
        n_kept += tl.sum(keep.to(tl.int32), axis=0)
    return n_kept


@triton.jit
def _select_phase(scores_row, hist_row, meta_row, kept_ptr, n_kept, cand_row, out_row, k, first,
                  BLOCK: tl.constexpr, SCAN: tl.constexpr):
    """The kept scores with digit above the threshold T to the output, those at T to the candidate
    list (one atomic per block reserving slots in each)."""
    t_hi, above_hi = _find_threshold(hist_row, tl.load(meta_row, cache_modifier=".cg"), k, SCAN)
    if first:  # for the finishing program
        tl.store(meta_row + 6, above_hi)
    for n0 in range(0, n_kept, BLOCK):
        j = n0 + tl.arange(0, BLOCK)
        valid = j < n_kept
        pos = tl.load(kept_ptr + j, mask=valid, other=0)
        digit = _digit(tl.load(scores_row + pos, mask=valid, other=0.0))
        win = valid & (digit > t_hi)
        n_win = tl.sum(win.to(tl.int32), axis=0)
        if n_win > 0:
            base = tl.atomic_add(meta_row + 1, n_win, sem="relaxed")
            tl.store(out_row + base + tl.cumsum(win.to(tl.int32), axis=0) - 1, pos, mask=win)
        cand = valid & (digit == t_hi)
        n_cand = tl.sum(cand.to(tl.int32), axis=0)
        if n_cand > 0:
            base = tl.atomic_add(meta_row + 2, n_cand, sem="relaxed")
            tl.store(cand_row + base + tl.cumsum(cand.to(tl.int32), axis=0) - 1, pos, mask=cand)


@triton.jit
def _candidates(cand_row, scores_row, n0, n_cand, BLOCK: tl.constexpr):
    """Candidates n0 .. n0 + BLOCK of a row: (positions, order keys, valid mask)."""
    j = n0 + tl.arange(0, BLOCK)
    valid = j < n_cand
    pos = tl.load(cand_row + j, mask=valid, other=0, cache_modifier=".cg")
    return pos, _order_key(tl.load(scores_row + pos, mask=valid, other=0.0, cache_modifier=".cg")), valid


@triton.jit
def _resolve_by_sort(cand_row, scores_row, out_row, n_cand, written, need, RANK: tl.constexpr):
    """At most RANK candidates: sorted in registers by (order key, position) packed into one
    int64, largest first; the first `need` take the remaining slots. One read of the candidate
    list and of their scores, then no memory traffic until the stores."""
    pos, key, valid = _candidates(cand_row, scores_row, 0, n_cand, RANK)
    packed = (key.to(tl.int64) << 32) | pos.to(tl.int64)  # ordered by key, then position
    packed = tl.sort(tl.where(valid, packed, -9223372036854775808), descending=True)
    slot = tl.arange(0, RANK)
    tl.store(out_row + written + slot, packed.to(tl.int32), mask=slot < need)  # the low 32 bits: position


@triton.jit
def _resolve_by_digits(cand_row, scores_row, out_row, n_cand, written, need, BLOCK: tl.constexpr,
                       BINS: tl.constexpr):
    """Any number of candidates: radix select on the two low 8-bit digits, a block at a time."""
    offs_bins = tl.arange(0, BINS)
    hist_mid = tl.zeros([BINS], tl.int32)
    for n0 in range(0, n_cand, BLOCK):
        pos, key, valid = _candidates(cand_row, scores_row, n0, n_cand, BLOCK)
        hist_mid += tl.histogram((key >> 8) & 0xFF, BINS, mask=valid)
    t_mid, above_mid = _threshold(hist_mid, offs_bins, need)
    hist_lo = tl.zeros([BINS], tl.int32)
    for n0 in range(0, n_cand, BLOCK):
        pos, key, valid = _candidates(cand_row, scores_row, n0, n_cand, BLOCK)
        mid = (key >> 8) & 0xFF
        win = valid & (mid > t_mid)
        tl.store(out_row + written + tl.cumsum(win.to(tl.int32), axis=0) - 1, pos, mask=win)
        written += tl.sum(win.to(tl.int32), axis=0)
        hist_lo += tl.histogram(key & 0xFF, BINS, mask=valid & (mid == t_mid))
    t_lo, above_lo = _threshold(hist_lo, offs_bins, need - above_mid)
    ties_left = need - above_mid - above_lo  # equal keys at the very end: take any of them
    for n0 in range(0, n_cand, BLOCK):
        pos, key, valid = _candidates(cand_row, scores_row, n0, n_cand, BLOCK)
        at_mid = valid & (((key >> 8) & 0xFF) == t_mid)
        win = at_mid & ((key & 0xFF) > t_lo)
        tie = at_mid & ((key & 0xFF) == t_lo)
        tie = tie & (tl.cumsum(tie.to(tl.int32), axis=0) <= ties_left)
        take = win | tie
        tl.store(out_row + written + tl.cumsum(take.to(tl.int32), axis=0) - 1, pos, mask=take)
        written += tl.sum(take.to(tl.int32), axis=0)
        ties_left -= tl.sum(tie.to(tl.int32), axis=0)


@triton.jit
def _zero(ptr, lo, hi, BLOCK: tl.constexpr):
    """ptr[lo:hi] = 0."""
    for z0 in range(lo, hi, BLOCK):
        offs = z0 + tl.arange(0, BLOCK)
        tl.store(ptr + offs, tl.zeros([BLOCK], tl.int32), mask=offs < hi)


@triton.jit
def _finish_phase(scores_row, hist_row, coarse_row, meta_row, cand_row, out_row, seq_len, k,
                  RANK: tl.constexpr, BLOCK: tl.constexpr, BINS: tl.constexpr, META_WORDS: tl.constexpr):
    """One program per row: the candidates at the threshold digit take the slots left, then what the
    row touched of the workspace is zeroed for the next call."""
    max_digit = tl.load(meta_row, cache_modifier=".cg")
    n_cand = tl.load(meta_row + 2, cache_modifier=".cg")
    min_lane = 65535 - tl.load(meta_row + 3, cache_modifier=".cg")
    above_hi = tl.load(meta_row + 6, cache_modifier=".cg")
    bound = tl.load(meta_row + 9, cache_modifier=".cg")
    if seq_len <= k:  # every position is selected, then -1
        for n0 in range(0, k, BLOCK):
            slot = n0 + tl.arange(0, BLOCK)
            tl.store(out_row + slot, tl.where(slot < seq_len, slot, -1), mask=slot < k)
    else:
        if n_cand <= RANK:
            _resolve_by_sort(cand_row, scores_row, out_row, n_cand, above_hi, k - above_hi, RANK)
        else:
            _resolve_by_digits(cand_row, scores_row, out_row, n_cand, above_hi, k - above_hi, BLOCK, BINS)
        _zero(hist_row, bound, max_digit + 1, BLOCK)
        _zero(coarse_row, min_lane >> 4, (max_digit >> 4) + 1, BLOCK)
    tl.debug_barrier()
    tl.store(meta_row + tl.arange(0, META_WORDS), tl.zeros([META_WORDS], tl.int32))


@triton.jit
def _topk_kernel(
    q_ptr, kidx_ptr, block_table_ptr, seq_lens_ptr, scores_ptr, work_ptr, cand_ptr, kept_count_ptr, out_ptr,
    k, chunk_size, sub_chunk, n_members,
    stride_qb, stride_kr, stride_btb, stride_sb, stride_wb, stride_cb, stride_nb, stride_ob,
    PHASE: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    SWEEP_BLOCK: tl.constexpr, SCAN: tl.constexpr, RANK: tl.constexpr, FINISH_BLOCK: tl.constexpr,
    BINS: tl.constexpr, HIST: tl.constexpr, COARSE: tl.constexpr, META_WORDS: tl.constexpr, AHEAD: tl.constexpr,
    SWEEP_AHEAD: tl.constexpr,
):
    """PHASE 0: all four phases in one cooperative launch, grid (B, n_members), every program
    resident at once. PHASE 1, 2, 3: that phase alone, grid (B, n_members); PHASE 4: grid (B, 1)."""
    b = tl.program_id(0)
    member = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + b)
    start = member * chunk_size
    end = tl.minimum(start + chunk_size, seq_len)
    scores_row = scores_ptr + b * stride_sb
    hist_row = work_ptr + b * stride_wb
    coarse_row = hist_row + HIST
    meta_row = coarse_row + COARSE
    kept_ptr = cand_ptr + b * stride_cb + start  # this member's kept positions: the list's first half
    cand_row = cand_ptr + b * stride_cb + stride_sb  # the threshold digit's candidates: its second half
    kept_count = kept_count_ptr + b * stride_nb + member
    out_row = out_ptr + b * stride_ob
    busy = (seq_len > k) & (start < seq_len)

    if (PHASE == 0) | (PHASE == 1):
        if busy:
            _score_phase(q_ptr + b * stride_qb, kidx_ptr, block_table_ptr + b * stride_btb, scores_row, coarse_row,
                         meta_row, start, end, sub_chunk, stride_kr, D, PAGE, BLOCK_N, BLOCK_D, AHEAD)
    if PHASE == 0:
        _arrive_and_wait(meta_row + 7, n_members)
    if (PHASE == 0) | (PHASE == 2):
        if busy:
            bound = _row_bound(coarse_row, meta_row, k, SCAN)
            if member == 0:  # for the finishing program's clean-up
                tl.store(meta_row + 9, bound)
            tl.store(kept_count, _hist_phase(scores_row, hist_row, kept_ptr, bound, start, end, SWEEP_BLOCK,
                                             SWEEP_AHEAD))
    if PHASE == 0:
        _arrive_and_wait(meta_row + 7, 2 * n_members)
    if (PHASE == 0) | (PHASE == 3):
        if busy:
            _select_phase(scores_row, hist_row, meta_row, kept_ptr, tl.load(kept_count), cand_row, out_row, k,
                          member == 0, SWEEP_BLOCK, SCAN)
    finisher = PHASE == 4
    if PHASE == 0:
        tl.debug_barrier()
        finisher = tl.atomic_add(meta_row + 8, 1, sem="acq_rel", scope="gpu") == n_members - 1
    if finisher:  # the last member of the row to get here, or the single program of PHASE 4
        _finish_phase(scores_row, hist_row, coarse_row, meta_row, cand_row, out_row, seq_len, k,
                      RANK, FINISH_BLOCK, BINS, META_WORDS)


_WORKSPACE: dict[torch.device, torch.Tensor] = {}


def workspace(batch: int, device: torch.device) -> torch.Tensor:
    """The zeroed per-row histograms and counters, [>= batch, ROW_WORDS] int32. Each call leaves
    them zero again, so they are allocated once per device (grown when a larger batch comes).
    Calls on one device must not run concurrently on two streams."""
    work = _WORKSPACE.get(device)
    if work is None or work.shape[0] < batch:
        rows = max(batch, 2 * work.shape[0] if work is not None else 8)
        work = _WORKSPACE[device] = torch.zeros((rows, ROW_WORDS), dtype=torch.int32, device=device)
    return work


def launch_index_topk(q_idx: torch.Tensor, k_idx_cache: torch.Tensor, block_table: torch.Tensor,
                      seq_lens: torch.Tensor, k: int, out: torch.Tensor, *, n_members: int, cooperative: bool,
                      block_n: int, num_warps: int, num_stages: int, finish_warps: int, lanes_per_row: int,
                      max_registers: int | None = None, last_phase: int = 4, ahead: int = 1) -> None:
    """Writes the top-k positions of every row into `out` [B, k] int32.

    `n_members` programs per row, each a chunk of whole BLOCK_N blocks. `cooperative`: one launch,
    B x n_members programs all resident (the caller sizes it to the SM count; `max_registers` caps
    the registers per thread so that they fit); otherwise four. Sub-chunks are sized so that a
    full row publishes about `lanes_per_row` lane maxima; `ahead` (1 or 2) blocks of keys are in
    flight while one is scored. `last_phase` < 4 (four launches only, for timing the phases) stops
    early and leaves the workspace for the caller to zero."""
    batch, index_dim = q_idx.shape
    page = k_idx_cache.shape[1]
    max_len = block_table.shape[1] * page
    device = q_idx.device
    chunk = -(-max(1, -(-max_len // n_members)) // block_n) * block_n
    n_members = max(1, -(-max_len // chunk))
    blocks_per_chunk = chunk // block_n
    subs = max(1, min(blocks_per_chunk, -(-lanes_per_row // (n_members * block_n))))
    sub_chunk = -(-blocks_per_chunk // subs) * block_n
    scores = torch.empty((batch, max_len), dtype=torch.float32, device=device)
    # per row: each member's kept positions (at its chunk's offset), then the candidates at T
    listed = torch.empty((batch, 2 * scores.stride(0)), dtype=torch.int32, device=device)
    kept_counts = torch.empty((batch, n_members), dtype=torch.int32, device=device)
    work = workspace(batch, device)
    args = (q_idx, k_idx_cache, block_table, seq_lens, scores, work, listed, kept_counts, out,
            k, chunk, sub_chunk, n_members,
            q_idx.stride(0), k_idx_cache.stride(1), block_table.stride(0), scores.stride(0), work.stride(0),
            listed.stride(0), kept_counts.stride(0), out.stride(0))
    consts = dict(D=index_dim, PAGE=page, BLOCK_N=block_n, BLOCK_D=triton.next_power_of_2(index_dim),
                  SWEEP_BLOCK=min(SWEEP_BLOCK, triton.next_power_of_2(chunk)), SCAN=SCAN_BLOCK, RANK=RANK_BLOCK,
                  FINISH_BLOCK=FINISH_BLOCK, BINS=LOW_BINS, HIST=HIST_BINS, COARSE=COARSE_BINS, META_WORDS=META,
                  AHEAD=ahead, SWEEP_AHEAD=SWEEP_PREFETCH and chunk > SWEEP_BLOCK)
    if cooperative:
        extra = {} if interpreting() else {"launch_cooperative_grid": True, "maxnreg": max_registers}
        _topk_kernel[(batch, n_members)](*args, PHASE=0, **consts, num_warps=num_warps, num_stages=num_stages,
                                         **extra)
        return
    for phase in range(1, min(last_phase, 3) + 1):
        _topk_kernel[(batch, n_members)](*args, PHASE=phase, **consts, num_warps=num_warps, num_stages=num_stages)
    if last_phase >= 4:
        _topk_kernel[(batch, 1)](*args, PHASE=4, **consts, num_warps=finish_warps)
