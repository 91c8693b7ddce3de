"""Triton split-K flash-decoding over a paged K/V cache: sparse (selected rows) and dense (all rows).

One program handles one (sequence, KV head, split): the G = Hq / Hkv query heads of that KV head
are packed into one [BLOCK_G, d] tile, so each K/V row is read once for all of them. A split walks
BLOCK_N rows at a time with an online softmax in fp32 (base-2 exponentials) and writes its partial
output and log-sum-exp; a merge kernel combines the splits. Sparse mode reads physical rows that
`plan` translated once per step; dense mode walks positions and looks up the block table itself.

Launched with programmatic dependent launch (`pdl=True`, Hopper and later), a kernel may start
while the one before it is still running: it issues its first block of K/V rows - rows, block
table and cache - and only then waits (`gdc_wait`) to read the query and to write its outputs.
That is safe only for a cache the kernels just before do not write: `kv_before_wait=False` reads
the first block after the wait. Where the kernel ahead writes one known row of each sequence (the
fused q/k/v kernel writes the token's row of its ring), `fresh` names it: the block is read before
the wait as always, and that one row again after it (past L1), attended in place of what was read.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import triton
import triton.language as tl

from kernels.triton_gemm import prefetch_l2

if TYPE_CHECKING:
    import torch

LOG2E = 1.4426950408889634
# The merge kernel lets the next PDL-launched kernel start before it waits on its own inputs: the
# next layer's partial kernel then has its K/V rows in flight while this layer finishes.
EARLY_TRIGGER = True
# The partial kernel's trigger at its start instead of after its wait: then the kernel after it can
# launch (and put its own K/V rows in flight) while this one still waits on the kernel before it,
# so more than two layers' loads overlap. Safe because a kernel's pre-wait part reads only the rows,
# the block table and the cache, which nothing in a chain of attention kernels writes, and
# everything else only after its own wait (which implies every earlier kernel has completed).
PARTIAL_EARLY_TRIGGER = True  # B=1, 16 layers: 5.68 -> 5.41 us a layer (bench/floors.py, floors.json)
# L2 eviction policy of the K/V loads ("", "evict_first", "evict_last"). Every cross layer of a
# step reads the same selected rows of the one shared cache (8 MiB a sequence at 128K), so
# "evict_last" may keep them in L2 for the layers after; a window's ring is read once a step,
# so "evict_first" may keep it from pushing them out. Experiments, "" (the default policy): on
# the H200 at 128K either changed the decode step by under 0.5% (bench/decode_ab.py,
# bench/results/decode/decode_ab_switches.json); the selected rows (56 MiB at B = 7) outgrow L2.
SPARSE_KV_EVICTION = ""
DENSE_KV_EVICTION = ""
# The sparse partial kernel loads each block's planned rows one block ahead, so a block's K/V loads
# do not wait on its rows' load (the small-batch configuration runs one stage: nothing else
# overlaps them). Off: noise in the step on an H100 (128K, B = 7: +0.1%,
# bench/results/decode/decode_ab_prefetch_ahead_h100.json).
SPARSE_ROWS_AHEAD = False
# ... or each block's rows and K/V both loaded one block ahead (a second block's K/V in registers:
# more registers, fewer programs an SM). Over SPARSE_ROWS_AHEAD. Off: +2.1% at B = 7 on an H100 (same file).
SPARSE_KV_AHEAD = False
# Before its PDL wait, each sparse program also asks L2 for the K/V lines of the next
# SPARSE_PREFETCH_BLOCKS blocks of its split (their rows loaded there too; PTX prefetch.global.L2,
# no registers held): the loads after the wait then find them on chip, so the wait on the query's
# projection overlaps more than one block's reads. Compiled only (the interpreter has no inline
# assembly). Off: 1 block +0.1%, 3 blocks +2.8% at B = 7 on an H100 (same file).
SPARSE_PREFETCH_BLOCKS = 0
# K and V of a block in flight together in a one-stage partial kernel (the small-batch sparse
# configuration). Triton moves K's copy into shared memory (for the dot) right after K's load, and
# V's load came after that copy, which waits on K's data: two dependent trips to HBM a block (the
# sm_90 SASS: 8 LDG.128 of K, STS, then V's 8). K taken through where(mask, k, v) - the same values,
# both are 0 where masked - makes the copy wait on V's load too, so all 16 are issued first; V's
# buffer is then live beside K's (37 KB of shared memory a program instead of 23). Pipelined
# configurations (more than one stage) copy asynchronously and are left as they are. Off: slower on
# an H100 (128K, B = 7: 16 sparse layers in an L2-cold chain 25.15 us a layer against 23.67, the
# step 3.397 ms against 3.361; bench/results/sparse_loads_h100.json, decode_ab_kv_ring_h100.json).
KV_TOGETHER = False
# The next GEMM's weight asked of L2 by the attention kernel ahead of it (`l2_next` of the
# launchers: the layer's output projection, 18.9 MB at clsa-4b). The attention of a decode step is
# latency-bound (the rings' has almost no bytes; the sparse layer's reads run well under the HBM
# bandwidth), so HBM has room while it runs; the weight's lines, split among the programs, are
# asked for (PTX prefetch.global.L2, nothing held in registers) and the projection after it
# then reads them from L2. When: "wait" right after the PDL wait (the rings: their reads were
# before it), "end" after the program's last block (the sparse layer: after its own reads).
# L2_NEXT_EVICT_LAST: the lines asked with the evict_last priority, so the attention's own
# streaming reads do not push them out first.
L2_NEXT_AT = {"sparse": "end", "dense": "wait"}
L2_NEXT_EVICT_LAST = False
L2_NEXT_CHUNK = 512  # lines a program asks for at a time (a loop over its share)
MERGE_CHUNK = tl.constexpr(32)  # splits summed at a time by a merge over a whole head (a global the kernels read)
MERGE_ELEMS = tl.constexpr(4096)  # partial values a merging program reads at once (32 splits x d 128)


@triton.jit
def _merge_head(o_part_ptr, lse_part_ptr, out_ptr, b, head, n_splits,
                stride_ob, stride_oh, stride_os, stride_lb, stride_lh, stride_outb, stride_outh,
                D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, d0=0):
    """out[b, head, d0 : d0 + BLOCK_D] = sum_s 2^(lse_s - lse) * o_s over the splits; zeros when
    no split saw a key. Up to MERGE_ELEMS partial values are read at once (one memory round trip);
    more are summed MERGE_CHUNK splits at a time (all 256 of a dense B=1 call at once, over the
    whole head, spilled registers: the merge kernel gives each program a slice of d instead)."""
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = d0 + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    lse_row = lse_part_ptr + b * stride_lb + head * stride_lh
    o_row = o_part_ptr + b * stride_ob + head * stride_oh
    lse = tl.load(lse_row + offs_s, mask=offs_s < n_splits, other=float("-inf"))
    m = tl.max(lse, axis=0)
    m = tl.where(m == float("-inf"), 0.0, m)
    total = tl.sum(tl.exp2(lse - m), axis=0)
    if BLOCK_S * BLOCK_D <= MERGE_ELEMS:
        w = tl.exp2(lse - m)
        o = tl.load(o_row + offs_s[:, None] * stride_os + offs_d[None, :],
                    mask=(offs_s < n_splits)[:, None] & mask_d[None, :], other=0.0)
        acc = tl.sum(o * w[:, None], axis=0)
    else:
        acc = tl.zeros([BLOCK_D], tl.float32)
        for s0 in range(0, n_splits, MERGE_CHUNK):
            offs_c = s0 + tl.arange(0, MERGE_CHUNK)
            mask_c = offs_c < n_splits
            w = tl.exp2(tl.load(lse_row + offs_c, mask=mask_c, other=float("-inf")) - m)
            o = tl.load(o_row + offs_c[:, None] * stride_os + offs_d[None, :],
                        mask=mask_c[:, None] & mask_d[None, :], other=0.0)
            acc += tl.sum(o * w[:, None], axis=0)
    out = acc / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + b * stride_outb + head * stride_outh + offs_d, out.to(out_ptr.dtype.element_ty), mask=mask_d)


@triton.jit
def _merge_group(o_part_ptr, lse_part_ptr, out_ptr, b, h0, n_splits,
                 stride_ob, stride_oh, stride_os, stride_lb, stride_lh, stride_outb, stride_outh,
                 G: tl.constexpr, D: tl.constexpr, BLOCK_GM: tl.constexpr, BLOCK_S: tl.constexpr,
                 BLOCK_D: tl.constexpr):
    """`_merge_head` for the G query heads h0 .. h0 + G at once (BLOCK_GM >= G): every split's
    log-sum-exp and partial output of the group is one load, so the fused merge's tail is one
    memory round trip, not one per head. Needs BLOCK_S <= MERGE_CHUNK."""
    offs_g = tl.arange(0, BLOCK_GM)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    heads = h0 + offs_g
    mask_gs = (offs_g < G)[:, None] & (offs_s < n_splits)[None, :]
    lse = tl.load(lse_part_ptr + b * stride_lb + heads[:, None] * stride_lh + offs_s[None, :], mask=mask_gs,
                  other=float("-inf"))
    o = tl.load(o_part_ptr + b * stride_ob + heads[:, None, None] * stride_oh + offs_s[None, :, None] * stride_os
                + offs_d[None, None, :], mask=mask_gs[:, :, None] & (offs_d < D)[None, None, :], other=0.0)
    m = tl.max(lse, axis=1)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m[:, None])
    total = tl.sum(w, axis=1)
    out = tl.sum(o * w[:, :, None], axis=1) / tl.where(total > 0, total, 1.0)[:, None]
    tl.store(out_ptr + b * stride_outb + heads[:, None] * stride_outh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=(offs_g < G)[:, None] & (offs_d < D)[None, :])


@triton.jit
def _kv_block(k_ptr, v_ptr, rows_ptr, block_table_row, n0, end, h, stride_kr, stride_kh,
              D: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
              SPARSE: tl.constexpr, EVICT: tl.constexpr, TIE: tl.constexpr):
    """K and V rows of items n0 .. n0 + BLOCK_N (< end) of KV head h, and which are valid."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    valid = offs_n < end
    if SPARSE:
        rows = tl.load(rows_ptr + offs_n, mask=valid, other=-1)
    else:
        blocks = tl.load(block_table_row + offs_n // PAGE, mask=valid, other=0)
        rows = tl.where(valid, blocks * PAGE + offs_n % PAGE, -1)
    return _kv_rows(k_ptr, v_ptr, rows, h, stride_kr, stride_kh, D, BLOCK_D, EVICT, TIE)


@triton.jit
def _block_rows(rows_ptr, n0, end, BLOCK_N: tl.constexpr):
    """The planned physical rows of selected items n0 .. n0 + BLOCK_N, -1 past `end`."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    return tl.load(rows_ptr + offs_n, mask=offs_n < end, other=-1)


@triton.jit
def _kv_rows(k_ptr, v_ptr, rows, h, stride_kr, stride_kh, D: tl.constexpr, BLOCK_D: tl.constexpr,
             EVICT: tl.constexpr, TIE: tl.constexpr):
    """K and V of physical cache `rows` (< 0: none) of KV head h, and which are valid. TIE: K's
    use waits on V's load too (`KV_TOGETHER`), so both are issued before either is used."""
    offs_d = tl.arange(0, BLOCK_D)
    valid = rows >= 0
    rows = tl.where(valid, rows, 0).to(tl.int64)
    kv_offs = rows[:, None] * stride_kr + h * stride_kh + offs_d[None, :]
    kv_mask = valid[:, None] & (offs_d[None, :] < D)
    k = tl.load(k_ptr + kv_offs, mask=kv_mask, other=0.0, eviction_policy=EVICT)
    v = tl.load(v_ptr + kv_offs, mask=kv_mask, other=0.0, eviction_policy=EVICT)
    if TIE:
        k = tl.where(kv_mask, k, v)  # k unchanged (both 0 where masked), now after V's load
    return k, v, valid


@triton.jit
def _prefetch_kv_rows(k_ptr, v_ptr, rows, h, stride_kr, stride_kh, LINE: tl.constexpr, LINES: tl.constexpr):
    """Ask L2 for the LINES 128-byte lines (LINE elements each) of KV head h's K and V at cache
    `rows` (< 0: none; asked for row 0 instead, a line in range). Nothing is written."""
    rows = tl.where(rows >= 0, rows, 0).to(tl.int64)
    offs = rows[:, None] * stride_kr + h * stride_kh + (tl.arange(0, LINES) * LINE)[None, :]
    prefetch_l2(k_ptr + offs)
    prefetch_l2(v_ptr + offs)


@triton.jit
def _prefetch_share(pf_ptr, pf_lines, pf_per, program, LINE: tl.constexpr, CHUNK: tl.constexpr,
                    EVICT_LAST: tl.constexpr):
    """Ask L2 for lines program * pf_per .. + pf_per (< pf_lines) of the buffer at pf_ptr
    (LINE elements a 128-byte line)."""
    first = program.to(tl.int64) * pf_per
    last = tl.minimum(first + pf_per, pf_lines) - 1
    for c in range(0, pf_per, CHUNK):
        lines = tl.minimum(first + c + tl.arange(0, CHUNK), last)  # past the share: its last line again
        if EVICT_LAST:
            tl.inline_asm_elementwise("prefetch.global.L2::evict_last [$1];\n mov.u32 $0, 0;", "=r,l",
                                      [pf_ptr + lines * LINE], dtype=tl.int32, is_pure=False, pack=1)
        else:
            prefetch_l2(pf_ptr + lines * LINE)


@triton.jit
def _attend(q, k, v, valid, m_i, l_i, acc, sm_scale_log2, IEEE: tl.constexpr):
    """One block of the online softmax (base 2, fp32): returns the updated (m_i, l_i, acc)."""
    return _attend_masked(q, k, v, valid[None, :], m_i, l_i, acc, sm_scale_log2, IEEE)


@triton.jit
def _attend_masked(q, k, v, visible, m_i, l_i, acc, sm_scale_log2, IEEE: tl.constexpr):
    """`_attend` where `visible` [rows of q or 1, rows of k] says which query sees which key."""
    if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    s = tl.where(visible, s * sm_scale_log2, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    # Until a row has seen a valid key its max is -inf; shift by 0 then so exp2 stays finite.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if IEEE:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def _attend_row(q, k_row, v_row, ok, m_i, l_i, acc, sm_scale_log2):
    """`_attend` over one key row [d] (if `ok`), without a dot: the query heads' scores by a sum."""
    s = tl.sum(q.to(tl.float32) * k_row.to(tl.float32)[None, :], axis=1) * sm_scale_log2
    s = tl.where(ok, s, float("-inf"))
    m_new = tl.maximum(m_i, s)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe)
    return m_new, l_i * alpha + p, acc * alpha[:, None] + p[:, None] * v_row.to(tl.float32)[None, :]


@triton.jit
def _decode_partial_kernel(
    q_ptr, k_ptr, v_ptr, rows_ptr, block_table_ptr, seq_lens_ptr, o_part_ptr, lse_part_ptr,
    counter_ptr, out_ptr, fresh_ptr, pf_ptr, pf_lines, pf_per, sm_scale_log2, n_items, split_size, n_splits,
    stride_qb, stride_qh, stride_kr, stride_kh, stride_rb, stride_btb, stride_ob, stride_oh, stride_os,
    stride_lb, stride_lh, stride_outb, stride_outh,
    HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
    SPARSE: tl.constexpr, IEEE: tl.constexpr, FUSED_MERGE: tl.constexpr, USE_PDL: tl.constexpr,
    BLOCK_GM: tl.constexpr, EARLY: tl.constexpr, EVICT: tl.constexpr, ROWS_AHEAD: tl.constexpr,
    KV_AHEAD: tl.constexpr, PREFETCH_BLOCKS: tl.constexpr, LINE: tl.constexpr, LINES: tl.constexpr,
    KV_BEFORE_WAIT: tl.constexpr, KV_TIE: tl.constexpr, FRESH: tl.constexpr, PF_AT: tl.constexpr,
    PF_CHUNK: tl.constexpr, PF_LINE: tl.constexpr, PF_EVICT_LAST: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    b = pid_bh // HKV
    h = pid_bh % HKV
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    mask_g = offs_g < G
    mask_d = offs_d < D
    heads = h * G + offs_g

    if SPARSE:
        total = n_items
    else:
        total = tl.load(seq_lens_ptr + b)
    start = split * split_size
    end = tl.minimum(start + split_size, total)
    rows_row = rows_ptr + b * stride_rb
    block_table_row = block_table_ptr + b * stride_btb
    if USE_PDL:
        if EARLY:
            tl.extra.cuda.gdc_launch_dependents()
        if not KV_BEFORE_WAIT:  # the cache may have been written just before: read it after the wait
            tl.extra.cuda.gdc_wait()
    # The first block's K/V rows are in flight before waiting on the previous kernel (programmatic
    # dependent launch) unless KV_BEFORE_WAIT is off: the launcher says whether the kernels just
    # before write the cache (the fused q/k/v kernel writes a ring); the query and the outputs wait.
    k, v, valid = _kv_block(k_ptr, v_ptr, rows_row, block_table_row, start, end, h, stride_kr, stride_kh,
                            D, PAGE, BLOCK_N, BLOCK_D, SPARSE, EVICT, KV_TIE)
    if ROWS_AHEAD and not KV_AHEAD:
        # The next block's planned rows loaded a block ahead, so each block's K/V loads wait on one
        # memory round trip (the rows already in registers) instead of two (the rows, then K/V).
        next_rows = _block_rows(rows_row, start + BLOCK_N, end, BLOCK_N)
    if FRESH:
        # fresh[b]: the item whose row the kernel ahead writes (dense only). Its physical row, and
        # whether it falls in the block just read, need nothing that kernel writes.
        fresh = tl.load(fresh_ptr + b)
        fresh_hit = (fresh >= start) & (fresh < tl.minimum(start + BLOCK_N, end))
        fresh_item = tl.where(fresh_hit, fresh, start)
        fresh_row = (tl.load(block_table_row + fresh_item // PAGE) * PAGE + fresh_item % PAGE).to(tl.int64)
    for i in tl.static_range(PREFETCH_BLOCKS):
        _prefetch_kv_rows(k_ptr, v_ptr, _block_rows(rows_row, start + (i + 1) * BLOCK_N, end, BLOCK_N), h,
                          stride_kr, stride_kh, LINE, LINES)
    if USE_PDL:
        if KV_BEFORE_WAIT:
            tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=mask_g[:, None] & mask_d[None, :], other=0.0)
    if PF_AT == 1:  # the next GEMM's weight, right after the wait
        _prefetch_share(pf_ptr, pf_lines, pf_per, pid_bh * n_splits + split, PF_LINE, PF_CHUNK, PF_EVICT_LAST)
    if FRESH:
        # The row the kernel ahead wrote, read again now that it has finished: from L2 (".cg": the
        # read before the wait may have left the old line in this SM's L1). The first block's copy
        # is left out of its softmax and this one attended alone, after the blocks.
        fresh_offs = fresh_row * stride_kr + h * stride_kh + offs_d
        k_new = tl.load(k_ptr + fresh_offs, mask=fresh_hit & mask_d, other=0.0, cache_modifier=".cg")
        v_new = tl.load(v_ptr + fresh_offs, mask=fresh_hit & mask_d, other=0.0, cache_modifier=".cg")
        valid = valid & (start + tl.arange(0, BLOCK_N) != fresh)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    if KV_AHEAD:
        # Each block's K/V loads issued before the block ahead is attended, so a program keeps
        # loads in flight while it computes (one stage: the pipeliner overlaps nothing).
        for n0 in range(start + BLOCK_N, end, BLOCK_N):
            k1, v1, valid1 = _kv_block(k_ptr, v_ptr, rows_row, block_table_row, n0, end, h, stride_kr, stride_kh,
                                       D, PAGE, BLOCK_N, BLOCK_D, SPARSE, EVICT, KV_TIE)
            m_i, l_i, acc = _attend(q, k, v, valid, m_i, l_i, acc, sm_scale_log2, IEEE)
            k, v, valid = k1, v1, valid1
        m_i, l_i, acc = _attend(q, k, v, valid, m_i, l_i, acc, sm_scale_log2, IEEE)
    else:
        m_i, l_i, acc = _attend(q, k, v, valid, m_i, l_i, acc, sm_scale_log2, IEEE)
        for n0 in range(start + BLOCK_N, end, BLOCK_N):
            if ROWS_AHEAD:
                k, v, valid = _kv_rows(k_ptr, v_ptr, next_rows, h, stride_kr, stride_kh, D, BLOCK_D, EVICT, KV_TIE)
                next_rows = _block_rows(rows_row, n0 + BLOCK_N, end, BLOCK_N)
            else:
                k, v, valid = _kv_block(k_ptr, v_ptr, rows_row, block_table_row, n0, end, h, stride_kr, stride_kh,
                                        D, PAGE, BLOCK_N, BLOCK_D, SPARSE, EVICT, KV_TIE)
            m_i, l_i, acc = _attend(q, k, v, valid, m_i, l_i, acc, sm_scale_log2, IEEE)

    if FRESH:
        m_i, l_i, acc = _attend_row(q, k_new, v_new, fresh_hit, m_i, l_i, acc, sm_scale_log2)
    if PF_AT == 2:  # the next GEMM's weight, after this program's own reads
        _prefetch_share(pf_ptr, pf_lines, pf_per, pid_bh * n_splits + split, PF_LINE, PF_CHUNK, PF_EVICT_LAST)
    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
    o_offs = b * stride_ob + heads[:, None] * stride_oh + split * stride_os + offs_d[None, :]
    tl.store(o_part_ptr + o_offs, out, mask=mask_g[:, None] & mask_d[None, :])
    tl.store(lse_part_ptr + b * stride_lb + heads * stride_lh + split, lse, mask=mask_g)
    if FUSED_MERGE:
        # The last split of this (sequence, KV head) to finish merges all of them, so no second
        # launch is needed; it resets the counter for the next launch (CUDA-graph replays too).
        tl.debug_barrier()
        done = tl.atomic_add(counter_ptr + pid_bh, 1, sem="acq_rel", scope="gpu")
        if done == n_splits - 1:
            if BLOCK_S <= MERGE_CHUNK:
                _merge_group(o_part_ptr, lse_part_ptr, out_ptr, b, h * G, n_splits,
                             stride_ob, stride_oh, stride_os, stride_lb, stride_lh, stride_outb, stride_outh,
                             G, D, BLOCK_GM, BLOCK_S, BLOCK_D)
            else:
                for g in range(G):
                    _merge_head(o_part_ptr, lse_part_ptr, out_ptr, b, h * G + g, n_splits,
                                stride_ob, stride_oh, stride_os, stride_lb, stride_lh, stride_outb, stride_outh,
                                D, BLOCK_S, BLOCK_D)
            tl.store(counter_ptr + pid_bh, 0)


@triton.jit
def _packed_block(k_ptr, v_ptr, rows_ptr, n0, end, h0, stride_kr, stride_kh, HKV: tl.constexpr, D: tl.constexpr,
                  BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVICT: tl.constexpr):
    """K and V of selected tokens n0 .. n0 + BLOCK_N (< end) for KV heads h0 .. h0 + BLOCK_H, as
    [BLOCK_N * BLOCK_H, BLOCK_D] tiles whose row r is (token r // BLOCK_H, head h0 + r % BLOCK_H):
    a token's heads are adjacent in the cache, so each token is one contiguous BLOCK_H x d read."""
    offs_r = tl.arange(0, BLOCK_N * BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    tok = n0 + offs_r // BLOCK_H
    head = h0 + offs_r % BLOCK_H
    valid = (tok < end) & (head < HKV)
    rows = tl.load(rows_ptr + tok, mask=valid, other=-1)
    valid = valid & (rows >= 0)
    rows = tl.where(valid, rows, 0).to(tl.int64)
    offs = rows[:, None] * stride_kr + head[:, None] * stride_kh + offs_d[None, :]
    mask = valid[:, None] & (offs_d[None, :] < D)
    k = tl.load(k_ptr + offs, mask=mask, other=0.0, eviction_policy=EVICT)
    # V issued with K: both in flight at once.
    v = tl.load(v_ptr + offs, mask=mask, other=0.0, eviction_policy=EVICT)
    return k, v, valid, head


@triton.jit
def _sparse_wide_partial_kernel(
    q_ptr, k_ptr, v_ptr, rows_ptr, o_part_ptr, lse_part_ptr, sm_scale_log2, n_items, split_size,
    stride_qb, stride_qh, stride_kr, stride_kh, stride_rb, stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
    HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr, USE_PDL: tl.constexpr,
    EVICT: tl.constexpr,
):
    """Sparse partial attention, one program per (sequence, group of BLOCK_H KV heads, split): each
    selected token's K (and V) rows of all the group's heads - contiguous in the cache - are read
    as one piece. The scores of the group's BLOCK_H x G query heads against its BLOCK_N x BLOCK_H
    (token, head) rows are one [BLOCK_Q, BLOCK_N * BLOCK_H] tensor-core product masked to its
    block diagonal (a query head sees only its own KV head's rows): BLOCK_H times the FLOPs of the
    diagonal, which a kernel doing ~1 FLOP per byte can spend. Same partials as `_decode_partial_kernel`."""
    b = tl.program_id(0)
    h0 = tl.program_id(1) * BLOCK_H
    split = tl.program_id(2)
    start = split * split_size
    end = tl.minimum(start + split_size, n_items)
    rows_row = rows_ptr + b * stride_rb
    # The first block's rows are in flight before waiting on the previous kernel (as in
    # `_decode_partial_kernel`: only the query and the outputs are written by the kernel before).
    k, v, valid, kv_head = _packed_block(k_ptr, v_ptr, rows_row, start, end, h0, stride_kr, stride_kh, HKV, D,
                                         BLOCK_H, BLOCK_N, BLOCK_D, EVICT)
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    offs_q = tl.arange(0, BLOCK_Q)
    offs_d = tl.arange(0, BLOCK_D)
    q_head = h0 * G + offs_q  # query heads h0*G .. (h0 + BLOCK_H)*G, of KV heads h0 + offs_q // G
    mask_q = (offs_q < BLOCK_H * G) & (q_head < HKV * G)
    q = tl.load(q_ptr + b * stride_qb + q_head[:, None] * stride_qh + offs_d[None, :],
                mask=mask_q[:, None] & (offs_d[None, :] < D), other=0.0)
    own = (h0 + offs_q // G)[:, None]  # each query row's KV head
    m_i = tl.full([BLOCK_Q], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_Q], tl.float32)
    acc = tl.zeros([BLOCK_Q, BLOCK_D], tl.float32)
    m_i, l_i, acc = _attend_masked(q, k, v, valid[None, :] & (own == kv_head[None, :]), m_i, l_i, acc,
                                   sm_scale_log2, IEEE)
    for n0 in range(start + BLOCK_N, end, BLOCK_N):
        k, v, valid, kv_head = _packed_block(k_ptr, v_ptr, rows_row, n0, end, h0, stride_kr, stride_kh, HKV, D,
                                             BLOCK_H, BLOCK_N, BLOCK_D, EVICT)
        m_i, l_i, acc = _attend_masked(q, k, v, valid[None, :] & (own == kv_head[None, :]), m_i, l_i, acc,
                                       sm_scale_log2, IEEE)

    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
    o_offs = b * stride_ob + q_head[:, None] * stride_oh + split * stride_os + offs_d[None, :]
    tl.store(o_part_ptr + o_offs, out, mask=mask_q[:, None] & (offs_d[None, :] < D))
    tl.store(lse_part_ptr + b * stride_lb + q_head * stride_lh + split, lse, mask=mask_q)


@triton.jit
def _merge_splits_kernel(
    o_part_ptr, lse_part_ptr, out_ptr, n_splits,
    stride_ob, stride_oh, stride_os, stride_lb, stride_lh, stride_outb, stride_outh,
    HQ: tl.constexpr, D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, USE_PDL: tl.constexpr,
    EARLY: tl.constexpr,
):
    """Grid (B * HQ, d slices of BLOCK_D): every split of one slice is read at once."""
    pid = tl.program_id(0)
    if USE_PDL:
        if EARLY:  # the next layer's kernel may start prefetching its rows while this one waits
            tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    _merge_head(o_part_ptr, lse_part_ptr, out_ptr, pid // HQ, pid % HQ, n_splits,
                stride_ob, stride_oh, stride_os, stride_lb, stride_lh, stride_outb, stride_outh,
                D, BLOCK_S, BLOCK_D, tl.program_id(1) * BLOCK_D)


@triton.jit
def _positions_to_rows_kernel(
    indices_ptr, block_table_ptr, seq_lens_ptr, rows_ptr, k,
    stride_ib, stride_btb, stride_rb,
    PAGE: tl.constexpr, BLOCK: tl.constexpr,
):
    """rows[b, j] = physical row of token position indices[b, j], -1 where it is not a valid position."""
    b = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    in_range = offs < k
    pos = tl.load(indices_ptr + b * stride_ib + offs, mask=in_range, other=-1)
    valid = (pos >= 0) & (pos < tl.load(seq_lens_ptr + b))
    blocks = tl.load(block_table_ptr + b * stride_btb + pos // PAGE, mask=valid, other=0)
    rows = tl.where(valid, blocks * PAGE + pos % PAGE, -1)
    tl.store(rows_ptr + b * stride_rb + offs, rows, mask=in_range)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def plan_splits(n_items: int, n_programs: int, num_sms: int, block_n: int, waves: int,
                whole_wave: bool = False, max_splits: int = 256) -> tuple[int, int]:
    """Split `n_items` rows per (sequence, KV head) so that about `waves` x `num_sms` programs run:
    at least that many, or with `whole_wave` at most that many (`waves` then being the programs an
    SM holds at once: no program waits for a slot, so the layer takes one program's time, not two);
    at most `max_splits` splits. Returns (n_splits, split_size), split_size a multiple of block_n."""
    slots, programs = waves * num_sms, max(1, n_programs)
    want = slots // programs if whole_wave else _cdiv(slots, programs)
    n_splits = max(1, min(_cdiv(n_items, block_n), want, max_splits))
    split_size = _cdiv(_cdiv(max(n_items, 1), n_splits), block_n) * block_n
    return _cdiv(max(n_items, 1), split_size), split_size


def launch_decode(
    q, k_cache, v_cache, rows, block_table, seq_lens, sm_scale: float, n_items: int, n_splits: int,
    split_size: int, o_part, lse_part, counters, out, *, sparse: bool, block_n: int, num_warps: int,
    num_stages: int, fused_merge: bool, pdl: bool = False, kv_before_wait: bool = True,
    fresh: torch.Tensor | None = None, l2_next: torch.Tensor | None = None,
) -> None:
    """Partial attention per (sequence, KV head, split) and the merge of the splits into `out`:
    by the last split of each (sequence, KV head) when `fused_merge` (then `counters`, int32
    [B * Hkv], must be zero and is left zero), else by a second kernel. `pdl`: launch with
    programmatic dependent launch (Hopper and later), so each kernel is resident and has its
    first K/V rows in flight before the kernel ahead of it finishes (unless `kv_before_wait` is
    False: for a cache the kernel just before may have written). `fresh` (dense only, int [B]): the
    item of each sequence whose row the kernel just before writes, re-read after the wait.
    `l2_next` (contiguous): what the kernel after it reads first - the next GEMM's weight - asked
    of L2 by its programs (`L2_NEXT_AT`; compiled only: the interpreter has no inline assembly)."""
    if sparse and fresh is not None:
        raise ValueError("launch_decode: `fresh` names a row of a dense walk, not of planned sparse rows")
    batch, n_q_heads, head_dim = q.shape
    _, page, n_kv_heads, _ = k_cache.shape
    group = n_q_heads // n_kv_heads
    block_d = triton.next_power_of_2(head_dim)
    block_s = max(2, triton.next_power_of_2(n_splits))
    rows_arg = rows if rows is not None else seq_lens
    stride_rb = rows.stride(0) if rows is not None else 0
    line = 128 // k_cache.element_size()  # elements in a 128-byte line
    prefetch_blocks = SPARSE_PREFETCH_BLOCKS if sparse and pdl else 0  # pdl: compiled, Hopper or later
    part_strides = (o_part.stride(0), o_part.stride(1), o_part.stride(2), lse_part.stride(0), lse_part.stride(1),
                    out.stride(0), out.stride(1))
    pf_at, pf_lines, pf_per, pf_line = 0, 0, 0, 1
    if l2_next is not None and pdl:  # pdl: compiled, Hopper or later
        if not l2_next.is_contiguous():
            raise ValueError("launch_decode: l2_next must be contiguous")
        pf_at = {"wait": 1, "end": 2}[L2_NEXT_AT["sparse" if sparse else "dense"]]
        pf_line = 128 // l2_next.element_size()
        pf_lines = _cdiv(l2_next.numel(), pf_line)
        pf_per = _cdiv(pf_lines, batch * n_kv_heads * n_splits)
    _decode_partial_kernel[(batch * n_kv_heads, n_splits)](
        q, k_cache, v_cache, rows_arg, block_table, seq_lens, o_part, lse_part,
        counters if fused_merge else seq_lens, out, seq_lens if fresh is None else fresh,
        seq_lens if l2_next is None else l2_next, pf_lines, pf_per, sm_scale * LOG2E, n_items, split_size, n_splits,
        q.stride(0), q.stride(1), k_cache.stride(1), k_cache.stride(2), stride_rb, block_table.stride(0),
        *part_strides,
        HKV=n_kv_heads, G=group, D=head_dim, PAGE=page, BLOCK_G=max(16, triton.next_power_of_2(group)),
        BLOCK_GM=triton.next_power_of_2(group), BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_S=block_s, SPARSE=sparse,
        IEEE=q.dtype.itemsize == 4,
        FUSED_MERGE=fused_merge, USE_PDL=pdl, EARLY=PARTIAL_EARLY_TRIGGER,
        EVICT=SPARSE_KV_EVICTION if sparse else DENSE_KV_EVICTION, ROWS_AHEAD=sparse and SPARSE_ROWS_AHEAD,
        KV_AHEAD=sparse and SPARSE_KV_AHEAD, PREFETCH_BLOCKS=prefetch_blocks, LINE=line,
        LINES=triton.next_power_of_2(_cdiv(head_dim, line)), KV_BEFORE_WAIT=kv_before_wait,
        KV_TIE=KV_TOGETHER and num_stages == 1 and not (sparse and SPARSE_KV_AHEAD),
        FRESH=fresh is not None and kv_before_wait, PF_AT=pf_at, PF_CHUNK=L2_NEXT_CHUNK, PF_LINE=pf_line,
        PF_EVICT_LAST=L2_NEXT_EVICT_LAST,
        num_warps=num_warps, num_stages=num_stages, **_pdl(pdl),
    )
    if not fused_merge:
        launch_merge(o_part, lse_part, out, n_splits, part_strides, pdl)


def plan_wide_splits(n_items: int, n_programs: int, num_sms: int, block_n: int, waves: int,
                     max_splits: int = 64) -> tuple[int, int]:
    """Splits for the wide kernel, whose programs are `n_programs` (sequence, head group) pairs
    times the splits: as many splits as fit in `waves` x `num_sms` programs without starting a
    partial wave, at most `max_splits` (the merge kernel holds every split of a head at once)."""
    return plan_splits(n_items, n_programs, num_sms, block_n, waves, whole_wave=True, max_splits=max_splits)


def wide_tile(n_kv_heads: int, heads_per_program: int, block_n: int) -> tuple[int, int, int]:
    """(KV heads per program, tokens per block, head groups per sequence) of the wide kernel: the
    heads a power of two (at most the next one above Hkv), the tile at least 16 (token, head) rows
    (tl.dot's smallest K)."""
    if heads_per_program < 1 or heads_per_program & (heads_per_program - 1):
        raise ValueError(f"wide sparse kernel: heads_per_program must be a power of two, got {heads_per_program}")
    block_h = min(heads_per_program, triton.next_power_of_2(n_kv_heads))
    return block_h, max(block_n, 16 // block_h), _cdiv(n_kv_heads, block_h)


def launch_sparse_wide(q, k_cache, v_cache, rows, sm_scale: float, n_items: int, n_splits: int, split_size: int,
                       o_part, lse_part, out, *, block_n: int, heads_per_program: int, num_warps: int,
                       num_stages: int, pdl: bool = False) -> None:
    """Sparse attention by the wide kernel (`heads_per_program` KV heads of a token - a power of
    two - read in one piece) and the merge kernel; buffers as `launch_decode`'s."""
    batch, n_q_heads, head_dim = q.shape
    n_kv_heads = k_cache.shape[2]
    group = n_q_heads // n_kv_heads
    block_h, block_n, n_groups = wide_tile(n_kv_heads, heads_per_program, block_n)
    if split_size % block_n:
        raise ValueError(f"wide sparse kernel: split_size {split_size} is not a multiple of {block_n} tokens")
    block_d = triton.next_power_of_2(head_dim)
    part_strides = (o_part.stride(0), o_part.stride(1), o_part.stride(2), lse_part.stride(0), lse_part.stride(1),
                    out.stride(0), out.stride(1))
    _sparse_wide_partial_kernel[(batch, n_groups, n_splits)](
        q, k_cache, v_cache, rows, o_part, lse_part, sm_scale * LOG2E, n_items, split_size,
        q.stride(0), q.stride(1), k_cache.stride(1), k_cache.stride(2), rows.stride(0), *part_strides[:5],
        HKV=n_kv_heads, G=group, D=head_dim, BLOCK_H=block_h, BLOCK_Q=max(16, triton.next_power_of_2(block_h * group)),
        BLOCK_N=block_n, BLOCK_D=block_d, IEEE=q.dtype.itemsize == 4, USE_PDL=pdl, EVICT=SPARSE_KV_EVICTION,
        num_warps=num_warps,
        num_stages=num_stages, **_pdl(pdl),
    )
    launch_merge(o_part, lse_part, out, n_splits, part_strides, pdl)


def launch_merge(o_part, lse_part, out, n_splits: int, part_strides: tuple[int, ...], pdl: bool) -> None:
    """The merge kernel over `n_splits` partials per head: each program merges a slice of d small
    enough that all splits of it are read at once (MERGE_ELEMS values)."""
    batch, n_q_heads, head_dim = out.shape
    block_s = max(2, triton.next_power_of_2(n_splits))
    block_d = min(triton.next_power_of_2(head_dim), max(16, MERGE_ELEMS.value // block_s))
    _merge_splits_kernel[(batch * n_q_heads, triton.cdiv(head_dim, block_d))](
        o_part, lse_part, out, n_splits, *part_strides,
        HQ=n_q_heads, D=head_dim, BLOCK_S=block_s, BLOCK_D=block_d, USE_PDL=pdl, EARLY=EARLY_TRIGGER, num_warps=4,
        **_pdl(pdl),
    )


def _pdl(pdl: bool) -> dict[str, bool]:
    return {"launch_pdl": True} if pdl else {}


@triton.jit
def _gather_rows_kernel(k_ptr, v_ptr, rows_ptr, kv_ptr, rows_out_ptr, n_items, stride_kr, stride_rb, v_offset,
                        ROW: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Selected items j0 .. j0 + BLOCK_R of sequence b: the K and V rows (ROW = Hkv x d elements
    each, contiguous) at their planned cache rows copied to item b * n_items + j of the compact
    buffer (V at v_offset past K), zeros for an unplanned item (row < 0); rows_out[b, j] = that
    item, or -1 where there is none."""
    b = tl.program_id(0)
    j = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    in_range = j < n_items
    rows = tl.load(rows_ptr + b * stride_rb + j, mask=in_range, other=-1)
    valid = in_range & (rows >= 0)
    item = b * n_items + j
    src = tl.where(valid, rows, 0).to(tl.int64)[:, None] * stride_kr
    dst = item.to(tl.int64)[:, None] * ROW
    for c0 in tl.static_range(0, ROW, BLOCK_C):
        cols = (c0 + tl.arange(0, BLOCK_C))[None, :]
        k = tl.load(k_ptr + src + cols, mask=valid[:, None] & (cols < ROW), other=0.0)
        v = tl.load(v_ptr + src + cols, mask=valid[:, None] & (cols < ROW), other=0.0)
        tl.store(kv_ptr + dst + cols, k, mask=in_range[:, None] & (cols < ROW))
        tl.store(kv_ptr + v_offset + dst + cols, v, mask=in_range[:, None] & (cols < ROW))
    tl.store(rows_out_ptr + item, tl.where(valid, item, -1), mask=in_range)


def launch_gather_rows(k_cache, v_cache, rows, kv, rows_out, *, block_rows: int = 8) -> None:
    """The selected K/V rows of every sequence copied once into the compact `kv` [2, B, k, Hkv, d]
    (K then V; contiguous) and `rows_out` [B, k] int32 (contiguous) set to each item's row there
    (b * k + j, -1 where `rows` has none): a cache [B * k, 1, Hkv, d] that the sparse kernels
    read as they read the paged one. The caches' rows [Hkv, d] must be contiguous."""
    batch, k = rows.shape
    row = k_cache.shape[2] * k_cache.shape[3]
    block_c = min(triton.next_power_of_2(row), 1024)
    _gather_rows_kernel[(batch, _cdiv(k, block_rows))](
        k_cache, v_cache, rows, kv, rows_out, k, k_cache.stride(1), rows.stride(0), kv.stride(0),
        ROW=row, BLOCK_R=block_rows, BLOCK_C=block_c,
    )


def launch_positions_to_rows(indices, block_table, seq_lens, rows, page: int) -> None:
    batch, k = indices.shape
    block = 256
    _positions_to_rows_kernel[(batch, _cdiv(k, block))](
        indices, block_table, seq_lens, rows, k, indices.stride(0), block_table.stride(0), rows.stride(0),
        PAGE=page, BLOCK=block,
    )


@triton.jit
def _window_attention_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, cos_ptr, sin_ptr, n_queries, n_keys, q_offset, key_start, window, sm_scale_log2,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_ob, stride_ot, stride_oh, stride_rb, stride_rt,
    HQ: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr, ROPE: tl.constexpr, HEADS_FIRST: tl.constexpr,
):
    """Prefill attention to a sliding window: one program per (BLOCK_M queries, sequence, query
    head) walks only the key blocks its window touches, (W + BLOCK_M) / BLOCK_N of them, with the
    online softmax of the decode kernels. Query t is key t + q_offset and sees keys j with
    key_start <= j and 0 <= t + q_offset - j < W. ROPE: q comes unrotated and is rotated here
    (rotate-half, by cos and sin [B, Tq, D / 2] fp32), in fp32 and rounded to q's dtype as a
    separate pass would leave it. HEADS_FIRST: the grid's fastest axis is the head, so the
    programs of one query block (and their cos and sin) run together."""
    if HEADS_FIRST:
        pid_bh = tl.program_id(0)
        pid_m = tl.program_id(1)
    else:
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
    b = pid_bh // HQ
    h = pid_bh % HQ
    kvh = h // G
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    row_ok = offs_m < n_queries
    q_rows = q_ptr + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt
    q = tl.load(q_rows + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    if ROPE:
        HALF: tl.constexpr = D // 2
        # column d pairs with d +- D/2: out[d] = q[d] cos - q[d + D/2] sin (d < D/2), q[d] cos + q[d - D/2] sin
        partner = tl.load(q_rows + ((offs_d + HALF) % D)[None, :], mask=row_ok[:, None], other=0.0)
        angle = b * stride_rb + offs_m[:, None] * stride_rt + (offs_d % HALF)[None, :]
        c = tl.load(cos_ptr + angle, mask=row_ok[:, None], other=1.0)
        sn = tl.load(sin_ptr + angle, mask=row_ok[:, None], other=0.0)
        sign = tl.where(offs_d < HALF, -1.0, 1.0)
        q = (q.to(tl.float32) * c + partner.to(tl.float32) * (sn * sign[None, :])).to(q_ptr.dtype.element_ty)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    lo = tl.maximum(pid_m * BLOCK_M + q_offset - window + 1, key_start) // BLOCK_N * BLOCK_N
    hi = tl.minimum((pid_m + 1) * BLOCK_M + q_offset, n_keys)
    k_base = k_ptr + b * stride_kb + kvh * stride_kh
    v_base = v_ptr + b * stride_vb + kvh * stride_vh
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        col_ok = (offs_n < n_keys) & (offs_n >= key_start)
        k = tl.load(k_base + offs_n[:, None] * stride_kt + offs_d[None, :], mask=col_ok[:, None], other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :], mask=col_ok[:, None], other=0.0)
        diff = offs_m[:, None] + q_offset - offs_n[None, :]
        visible = (diff >= 0) & (diff < window) & col_ok[None, :]
        m_i, l_i, acc = _attend_masked(q, k, v, visible, m_i, l_i, acc, sm_scale_log2, IEEE)
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


def launch_window_attention(q, k, v, out, window: int, sm_scale: float, q_offset: int, key_start: int, *,
                            block_m: int, block_n: int, num_warps: int, num_stages: int, rope=None,
                            heads_first: bool = False) -> None:
    """`out[b, t, h]` = softmax over keys j of max(key_start, t + q_offset - window + 1) ..
    t + q_offset, for q [B, Tq, Hq, d], k, v [B, Tk, Hkv, d] (last dimension contiguous).
    `rope`: (cos, sin), fp32 [B, Tq, d / 2] with the last dimension contiguous - q is rotated by
    them first. `heads_first`: heads on the grid's fastest axis."""
    batch, n_queries, n_q_heads, head_dim = q.shape
    blocks = triton.cdiv(n_queries, block_m)
    cos, sin = rope if rope is not None else (out, out)
    _window_attention_kernel[(batch * n_q_heads, blocks) if heads_first else (blocks, batch * n_q_heads)](
        q, k, v, out, cos, sin, n_queries, k.shape[1], q_offset, key_start, window, sm_scale * LOG2E,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        cos.stride(0) if rope is not None else 0, cos.stride(1) if rope is not None else 0,
        HQ=n_q_heads, G=n_q_heads // k.shape[2], D=head_dim, BLOCK_M=block_m, BLOCK_N=block_n,
        IEEE=q.dtype.itemsize == 4, ROPE=rope is not None, HEADS_FIRST=heads_first,
        num_warps=num_warps, num_stages=num_stages,
    )
