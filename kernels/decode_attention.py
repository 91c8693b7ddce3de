"""Decode attention over a paged K/V cache: sparse (over selected positions) and dense (all).

Both take one query token per sequence, GQA heads (`Hq % Hkv == 0`), accumulate in fp32 and return
the query's dtype.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from kernels._backend import Backend, cuda_capability, interpreting, num_sms, resolve_backend
from kernels._checks import FLOAT_DTYPES, check_dtype, check_paged, check_rank, check_same_device
from kernels.paged import gather_tokens


def sparse_decode_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    indices: torch.Tensor,
    sm_scale: float,
) -> torch.Tensor:
    """The spec: softmax over the positions in `indices` (entries < 0 or >= seq_lens ignored).
    A row with no valid position yields zeros."""
    batch, n_q_heads, head_dim = q.shape
    n_kv_heads = k_cache.shape[2]
    group = n_q_heads // n_kv_heads
    keys = gather_tokens(k_cache, block_table, indices).float()  # [B, n, Hkv, d]
    values = gather_tokens(v_cache, block_table, indices).float()
    valid = (indices >= 0) & (indices < seq_lens[:, None])
    qg = q.float().view(batch, n_kv_heads, group, head_dim)
    scores = torch.einsum("bhgd,bnhd->bhgn", qg, keys) * sm_scale
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    out = torch.einsum("bhgn,bnhd->bhgd", probs, values)
    return out.reshape(batch, n_q_heads, head_dim).to(q.dtype)


def dense_decode_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    sm_scale: float,
) -> torch.Tensor:
    """The spec: softmax over every position < seq_lens[b]."""
    max_len = int(seq_lens.max()) if q.shape[0] else 0
    positions = torch.arange(max_len, device=q.device, dtype=torch.int32).expand(q.shape[0], max_len)
    return sparse_decode_attention_reference(q, k_cache, v_cache, block_table, seq_lens, positions, sm_scale)


def _check(op: str, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
           block_table: torch.Tensor, seq_lens: torch.Tensor) -> None:
    check_rank(op, "q", q, 3, "[B, Hq, d]")
    check_rank(op, "k_cache", k_cache, 4, "[num_blocks, block_size, Hkv, d]")
    check_dtype(op, "q", q, FLOAT_DTYPES)
    check_dtype(op, "k_cache", k_cache, FLOAT_DTYPES)
    if v_cache.shape != k_cache.shape or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"{op}: v_cache {tuple(v_cache.shape)} {v_cache.dtype} must match "
                         f"k_cache {tuple(k_cache.shape)} {k_cache.dtype}")
    if q.shape[2] != k_cache.shape[3]:
        raise ValueError(f"{op}: head_dim mismatch: q {q.shape[2]}, cache {k_cache.shape[3]}")
    if q.shape[1] % k_cache.shape[2] != 0:
        raise ValueError(f"{op}: Hq ({q.shape[1]}) must be a multiple of Hkv ({k_cache.shape[2]})")
    check_paged(op, block_table, seq_lens, q.shape[0])
    check_same_device(op, q=q, k_cache=k_cache, v_cache=v_cache, block_table=block_table, seq_lens=seq_lens)


# Launch configurations: (BLOCK_N, num_warps, num_stages, fused_merge), from the sweeps on an H200
# (bench/sweep_kernels.py; docs/kernels.md). One fixed configuration when interpreting (no
# autotuning there); the tests run both merge paths. Sparse attention at up to SMALL_BATCH
# sequences (SPARSE_SMALL_*) is latency, not bytes: its splits are merged by the last one to
# finish, so a layer is one launch (16 layers at B=1: 90 us against 99 with a merge kernel; in
# the whole clsa-4b step at 128K, B=7, with SMALL_BATCH 7 instead of 1: 2.906 -> 2.871 ms).
SPARSE_CONFIG = (64, 4, 2, False)
SPARSE_SMALL_CONFIG = (64, 4, 1, True)
SMALL_BATCH = 7
DENSE_CONFIG = (128, 4, 3, False)
# Dense attention at up to DENSE_FUSED_MAX_BATCH sequences merges its splits in the partial kernel's
# last split (one launch a layer, as SPARSE_SMALL_CONFIG); 0: DENSE_CONFIG's choice at every batch.
# The clsa-4b step at 128K, B=7 (16 ring layers): 2.906 -> 2.858 ms; both fused: 2.832.
DENSE_FUSED_MAX_BATCH = 7
# Dense attention over at most DENSE_SMALL_MAX_LEN positions (a block table that wide: the self
# layers' rings, not a whole cache - dense YOCO keeps DENSE_CONFIG) at up to DENSE_FUSED_MAX_BATCH
# sequences in this configuration (BLOCK_N, warps, stages; merged by the last split) instead of
# DENSE_CONFIG's; None: DENSE_CONFIG's. The self layers' rings (512 rows) take 4 splits of one
# 128-row block at B = 7, 224 programs: DENSE_CONFIG's 3 stages (139 KB of shared memory) fit one
# an SM, two waves; 2 stages (74 KB) fit two, one wave.
# The 128K step on an H100, B = 7: 3.363 -> 3.286 ms (-2.3%; (64, 4, 1) and (64, 4, 2) -2.1%,
# -2.0%), B = 1 2.723 -> 2.732 (noise) (bench/results/decode/decode_ab_ring_config_h100.json).
DENSE_SMALL_CONFIG: tuple[int, int, int] | None = (128, 4, 2)
DENSE_SMALL_MAX_LEN = 2048
INTERPRET_CONFIG = (16, 1, 1, True)
SPARSE_WAVES = 8  # programs per SM that the split planner aims for
SPARSE_SMALL_WAVES = 3  # the small configuration's programs an SM holds (150 registers a thread)
# The small configuration's splits planned so that every program has a slot at once (at most
# SPARSE_SMALL_WAVES x SMs programs) instead of at least that many: at B = 7 (56 sequence-head
# pairs) 7 splits of 320 rows, 392 programs, instead of 8 of 256, 448 programs - of which 52 wait
# for a second wave. B = 1 to 6 plan the same either way. Off: +1.1-1.4% at B = 7 on an H100
# (bench/results/decode/decode_ab_wave_topk7_h100.json, decode_ab_prefetch_ahead_h100.json).
SPARSE_SMALL_WHOLE_WAVE = False
DENSE_WAVES = 16
# Programmatic dependent launch on Hopper and later, at up to PDL_MAX_BATCH sequences: each kernel
# is resident, with its first K/V rows in flight, before the kernel ahead of it ends; it waits only
# to read the query and to write. Measured on the H200: 16 layers at B=1 in 100 us instead of 150;
# at B=8 and 32 a lone call costs 3-4 us more with it and a chain gains nothing, so it is off there.
# In the whole step, between PDL-launched skinny GEMMs, it pays at B=7 too (clsa-4b, 128K:
# 3.013 -> 2.954 ms), so up to the Transformer's largest batch at 128K.
PDL = True
PDL_MAX_BATCH = 7
# The wide sparse kernel at WIDE_MIN_BATCH sequences or more: one program per (sequence, group of
# KV heads, split), each selected token's rows of the group's heads read as one contiguous piece.
# (BLOCK_N tokens, KV heads per program, num_warps, num_stages, programs per SM). Measured on the
# H200 (bench/sweep_kernels.py --wide, --tune): groups of 8 heads lose to one head per program by
# 17-68%, groups of 2 and 4 tie or lose (reading 2 KB per token instead of 256 B bought nothing);
# with one head, 64 tokens a block and
# two splits per (sequence, head) at B=32 it beats the per-head kernel's planning (82 us against
# 87 at 128K), and ties it at B=8; it loses at B=1.
WIDE_CONFIG = (64, 1, 4, 2, 4)
WIDE_MIN_BATCH = 8
INTERPRET_WIDE_CONFIG = (4, 4, 1, 1, 1)
# A plan given the caches (`SparseDecodeWrapper.plan(gather_from=...)`) below WIDE_MIN_BATCH
# sequences copies the selected K/V rows once into a compact buffer [2, B, k, Hkv, d], which every
# layer's run then reads instead of the scattered rows: one buffer of the step, small enough
# (56 MiB at 128K, B = 7) to be kept in L2 across the layers by an access-policy window
# (kernels/l2_persist.py; the decode graphs' capture sets it, services/engine/graph_step.py).
# Off: measured slower on an H100 (128K, B = 7: +1.3%; with the L2 window +3.3%;
# bench/results/decode/decode_ab_gather_l2_h100.json, docs/performance.md).
GATHER_SELECTED = False


class SparseDecodeWrapper:
    """Sparse decode attention over one step's `indices`, shared by every cross layer.

    `plan()` once per decode step translates token positions to physical cache rows and sizes the
    split-K grid; `run()` once per layer only reads the selected K/V rows. Scratch buffers are
    reused across layers (and across steps of the same shape).
    """

    op = "sparse_decode_attention"

    def __init__(self, backend: Backend = "auto") -> None:
        self.backend = backend
        self._plan: dict | None = None
        self._runs = 0  # run() calls since the last plan()
        self._scratch: dict[tuple, tuple[torch.Tensor, ...]] = {}
        self._gather_buffers: tuple | None = None  # (key, kv, rows of kv) of the last gathering plan

    def plan(self, block_table: torch.Tensor, seq_lens: torch.Tensor, indices: torch.Tensor,
             block_size: int, gather_from: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """block_table [B, max_blocks] int32, seq_lens [B] int32, indices [B, k] int32 (-1 ignored).
        `gather_from`: the (k_cache, v_cache) the layers will run over; with GATHER_SELECTED (and
        the Triton backend, B < WIDE_MIN_BATCH) their selected rows are copied into `gathered`
        now, and every `run()` over those caches reads the copy."""
        op = self.op
        check_rank(op, "indices", indices, 2, "[B, k]")
        check_dtype(op, "indices", indices, (torch.int32,))
        check_paged(op, block_table, seq_lens, indices.shape[0])
        check_same_device(op, block_table=block_table, seq_lens=seq_lens, indices=indices)
        backend = resolve_backend(self.backend, indices.device, op)
        plan: dict = {"backend": backend, "block_table": block_table, "seq_lens": seq_lens,
                      "indices": indices, "block_size": block_size}
        if backend == "triton":
            from kernels.triton_attention import launch_positions_to_rows

            rows = torch.empty_like(indices)
            launch_positions_to_rows(indices, block_table, seq_lens, rows, block_size)
            plan["rows"] = rows
            if gather_from is not None and GATHER_SELECTED and indices.shape[0] < WIDE_MIN_BATCH:
                plan["gathered"] = self._gather(rows, *gather_from)
        self._plan = plan
        self._runs = 0

    @property
    def gathered(self) -> torch.Tensor | None:
        """The plan's compact copy of the selected K/V rows [2, B, k, Hkv, d] (None: none made)."""
        if self._plan is None or "gathered" not in self._plan:
            return None
        return self._plan["gathered"][2]

    def _gather(self, rows: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(k_cache, v_cache, kv, rows of kv): the selected rows copied into kv, kept across plans of
        one shape (a CUDA graph replays into the same buffer)."""
        from kernels.triton_attention import launch_gather_rows

        op = self.op
        if k_cache.shape != v_cache.shape or k_cache.dtype != v_cache.dtype:
            raise ValueError(f"{op}: gather_from caches differ: {tuple(k_cache.shape)} {k_cache.dtype}, "
                             f"{tuple(v_cache.shape)} {v_cache.dtype}")
        for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
            if c.dim() != 4 or c.stride(3) != 1 or c.stride(2) != c.shape[3] or c.stride(0) != c.shape[1] * c.stride(1):
                raise ValueError(f"{op}: gather_from {name} {tuple(c.shape)} must be [blocks, block_size, Hkv, d] "
                                 "with contiguous rows")
        batch, k = rows.shape
        key = (batch, k, *k_cache.shape[2:], k_cache.dtype, rows.device)
        if self._gather_buffers is None or self._gather_buffers[0] != key:
            kv = torch.empty((2, batch, k, *k_cache.shape[2:]), dtype=k_cache.dtype, device=rows.device)
            self._gather_buffers = (key, kv, torch.empty((batch, k), dtype=torch.int32, device=rows.device))
        _, kv, kv_rows = self._gather_buffers
        launch_gather_rows(k_cache, v_cache, rows, kv, kv_rows)
        return k_cache, v_cache, kv, kv_rows

    def run(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, sm_scale: float,
            out: torch.Tensor | None = None, l2_next: torch.Tensor | None = None) -> torch.Tensor:
        """q [B, Hq, d] of one layer -> out [B, Hq, d] over the planned rows. `l2_next`: as
        `dense_decode_attention`'s (the layer's output projection weight, read right after)."""
        if self._plan is None:
            raise RuntimeError(f"{self.op}: run() before plan()")
        p = self._plan
        _check(self.op, q, k_cache, v_cache, p["block_table"], p["seq_lens"])
        if k_cache.shape[1] != p["block_size"]:
            raise ValueError(f"{self.op}: planned for block_size {p['block_size']}, cache has {k_cache.shape[1]}")
        out = _output(self.op, q, out)
        if p["backend"] == "torch":
            out.copy_(sparse_decode_attention_reference(q, k_cache, v_cache, p["block_table"], p["seq_lens"],
                                                        p["indices"], sm_scale))
            return out
        rows, kv_before_wait = p["rows"], True
        if "gathered" in p and p["gathered"][0].data_ptr() == k_cache.data_ptr() \
                and p["gathered"][1].data_ptr() == v_cache.data_ptr():
            _, _, kv, rows = p["gathered"]
            shape = (kv.shape[1] * kv.shape[2], 1, *kv.shape[3:])
            k_cache, v_cache = kv[0].view(shape), kv[1].view(shape)
            # The first layer's kernel comes two launches after the copy: its K/V loads wait for
            # the kernel ahead (PDL), as the copy's writes are not yet certain to be visible.
            kv_before_wait = self._runs > 0
        self._runs += 1
        launch_sparse(q, k_cache, v_cache, rows, p["block_table"], p["seq_lens"], sm_scale, out,
                      sms=num_sms(q.device), pdl=_pdl(q.device, q.shape[0]), buffers=self._buffers,
                      kv_before_wait=kv_before_wait, l2_next=l2_next)
        return out

    def _buffers(self, q: torch.Tensor, n_kv_heads: int, n_splits: int) -> tuple[torch.Tensor, ...]:
        key = (q.shape[0], q.shape[1], q.shape[2], n_kv_heads, n_splits, q.device)
        if key not in self._scratch:
            self._scratch.clear()
            self._scratch[key] = _partials(q, n_kv_heads, n_splits)
        return self._scratch[key]


def _config(config: tuple[int, int, int, bool]) -> tuple[int, int, int, bool]:
    return INTERPRET_CONFIG if interpreting() else config


def _pdl(device: torch.device, batch: int) -> bool:
    return (PDL and batch <= PDL_MAX_BATCH and device.type == "cuda" and not interpreting()
            and cuda_capability(device) >= 9)


def _partials(q: torch.Tensor, n_kv_heads: int, n_splits: int) -> tuple[torch.Tensor, ...]:
    """Per-split outputs and log-sum-exps, and the zeroed split counters of the fused merge."""
    batch, n_q_heads, head_dim = q.shape
    o_part = torch.empty((batch, n_q_heads, n_splits, head_dim), dtype=torch.float32, device=q.device)
    lse_part = torch.empty((batch, n_q_heads, n_splits), dtype=torch.float32, device=q.device)
    counters = torch.zeros(batch * n_kv_heads, dtype=torch.int32, device=q.device)
    return o_part, lse_part, counters


def _kept_partials(workspace: dict, q: torch.Tensor, n_kv_heads: int, n_splits: int) -> tuple[torch.Tensor, ...]:
    """`_partials` kept in the caller's `workspace` per (shape, splits, device) instead of made (and
    zero-filled) per call: a zero-fill launch ahead of every layer breaks a chain of PDL launches.
    The counters stay valid because the fused merge leaves them zero and launches on one stream run
    in order (calls on concurrent streams need workspaces of their own)."""
    key = (*q.shape, n_kv_heads, n_splits, q.device)
    if key not in workspace:
        workspace[key] = _partials(q, n_kv_heads, n_splits)
    return workspace[key]


def _output(op: str, q: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        return torch.empty_like(q)
    if out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
        raise ValueError(f"{op}: out must be {tuple(q.shape)} {q.dtype} on {q.device}")
    return out


def sparse_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    indices: torch.Tensor,
    sm_scale: float,
    *,
    backend: Backend = "auto",
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of one query per sequence over the selected positions of a paged cache.

    q: [B, Hq, d]; k_cache, v_cache: [num_blocks, block_size, Hkv, d]; block_table: [B, max_blocks]
    int32; seq_lens: [B] int32; indices: [B, k] int32 token positions, -1 ignored. Returns
    out [B, Hq, d] in q's dtype (written into `out` when given). For many layers over the same
    indices, use `SparseDecodeWrapper`: plan once, run per layer.
    """
    _check("sparse_decode_attention", q, k_cache, v_cache, block_table, seq_lens)
    if indices.dim() == 2 and indices.shape[0] != q.shape[0]:
        raise ValueError(f"sparse_decode_attention: indices has B={indices.shape[0]}, q has B={q.shape[0]}")
    wrapper = SparseDecodeWrapper(backend)
    wrapper.plan(block_table, seq_lens, indices, k_cache.shape[1])
    return wrapper.run(q, k_cache, v_cache, sm_scale, out)


def dense_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    sm_scale: float,
    *,
    backend: Backend = "auto",
    out: torch.Tensor | None = None,
    workspace: dict | None = None,
    kv_before_wait: bool = True,
    fresh: torch.Tensor | None = None,
    l2_next: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of one query per sequence over all positions < seq_lens[b] of a paged cache.

    Shapes as `sparse_decode_attention`, without `indices`. The split grid is sized from the block
    table's width (an upper bound of every length), so no device-to-host sync is needed.
    `workspace`: a dict the caller keeps for calls of fixed shapes (a CUDA graph's decode step):
    the kernels' scratch is kept in it between calls rather than allocated and zeroed per call.
    `kv_before_wait` False: the cache was just written by a PDL-launched kernel (one that lets
    this one start before it ends: the fused q/k/v projection writing a ring), so with PDL the
    kernel reads its first K/V block only after its wait instead of before.
    `fresh` (int [B], on q's device): the position of each sequence whose row such a kernel writes,
    the only one it writes (the fused q/k/v kernel writes the token's ring row): with PDL every
    other row is read before the wait as usual and that one after it. Over `kv_before_wait`, which
    it makes unnecessary; the values are the same either way.
    `l2_next` (a contiguous tensor, e.g. the next projection's weight): asked of L2 by the kernel's
    programs while it runs, for the kernel after it (with PDL; `triton_attention.L2_NEXT_AT`).
    """
    op = "dense_decode_attention"
    _check(op, q, k_cache, v_cache, block_table, seq_lens)
    if fresh is not None:
        check_rank(op, "fresh", fresh, 1, "[B]")
        check_dtype(op, "fresh", fresh, (torch.int32, torch.int64))
        if fresh.shape[0] != q.shape[0]:
            raise ValueError(f"{op}: fresh has {fresh.shape[0]} entries for a batch of {q.shape[0]}")
        check_same_device(op, q=q, fresh=fresh)
    out = _output(op, q, out)
    if resolve_backend(backend, q.device, op) == "torch":
        out.copy_(dense_decode_attention_reference(q, k_cache, v_cache, block_table, seq_lens, sm_scale))
        return out
    launch_dense(q, k_cache, v_cache, block_table, seq_lens, sm_scale, out, sms=num_sms(q.device),
                 pdl=_pdl(q.device, q.shape[0]),
                 buffers=_partials if workspace is None else functools.partial(_kept_partials, workspace),
                 kv_before_wait=kv_before_wait, fresh=fresh, l2_next=l2_next)
    return out


def launch_sparse(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, rows: torch.Tensor,
                  block_table: torch.Tensor, seq_lens: torch.Tensor, sm_scale: float, out: torch.Tensor, *,
                  sms: int, pdl: bool,
                  buffers: Callable[[torch.Tensor, int, int], tuple[torch.Tensor, ...]] = _partials,
                  kv_before_wait: bool = True, l2_next: torch.Tensor | None = None) -> None:
    """The Triton sparse kernels over planned `rows` [B, k], in the configuration this batch takes on
    a card of `sms` multiprocessors; `buffers(q, n_kv_heads, n_splits)` gives the partials (as `_partials`).
    `kv_before_wait` False: the per-head kernel reads K/V only after its PDL wait. `l2_next`: as
    `dense_decode_attention`'s, by the per-head kernel (the wide one, from WIDE_MIN_BATCH, ignores it).
    `SparseDecodeWrapper.run` launches through it, and so does bench/compile_report.py."""
    from kernels.triton_attention import launch_decode, launch_sparse_wide, plan_splits, plan_wide_splits, wide_tile

    batch, k, n_kv_heads = q.shape[0], rows.shape[1], k_cache.shape[2]
    if batch >= WIDE_MIN_BATCH:
        block_n, heads, warps, stages, waves = INTERPRET_WIDE_CONFIG if interpreting() else WIDE_CONFIG
        _, block_n, groups = wide_tile(n_kv_heads, heads, block_n)
        n_splits, split_size = plan_wide_splits(k, batch * groups, sms, block_n, waves)
        o_part, lse_part, _ = buffers(q, n_kv_heads, n_splits)
        launch_sparse_wide(q, k_cache, v_cache, rows, sm_scale, k, n_splits, split_size, o_part, lse_part, out,
                           block_n=block_n, heads_per_program=heads, num_warps=warps, num_stages=stages, pdl=pdl)
        return
    small = batch <= SMALL_BATCH
    block_n, warps, stages, fused = _config(SPARSE_SMALL_CONFIG if small else SPARSE_CONFIG)
    waves = SPARSE_SMALL_WAVES if small else SPARSE_WAVES
    n_splits, split_size = plan_splits(k, batch * n_kv_heads, sms, block_n, waves, small and SPARSE_SMALL_WHOLE_WAVE)
    o_part, lse_part, counters = buffers(q, n_kv_heads, n_splits)
    launch_decode(q, k_cache, v_cache, rows, block_table, seq_lens, sm_scale, k, n_splits, split_size, o_part,
                  lse_part, counters, out, sparse=True, block_n=block_n, num_warps=warps, num_stages=stages,
                  fused_merge=fused, pdl=pdl, kv_before_wait=kv_before_wait, l2_next=l2_next)


def launch_dense(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                 seq_lens: torch.Tensor, sm_scale: float, out: torch.Tensor, *, sms: int, pdl: bool,
                 buffers: Callable[[torch.Tensor, int, int], tuple[torch.Tensor, ...]] = _partials,
                 kv_before_wait: bool = True, fresh: torch.Tensor | None = None,
                 l2_next: torch.Tensor | None = None) -> None:
    """The Triton dense kernels in the configuration this batch takes on a card of `sms`
    multiprocessors (`dense_decode_attention` and bench/compile_report.py launch through it);
    `buffers` gives the partials, as `launch_sparse`'s; `kv_before_wait`, `fresh` and `l2_next` as
    `dense_decode_attention`'s."""
    from kernels.triton_attention import launch_decode, plan_splits

    small = q.shape[0] <= DENSE_FUSED_MAX_BATCH
    max_len = block_table.shape[1] * k_cache.shape[1]
    ring = DENSE_SMALL_CONFIG if small and max_len <= DENSE_SMALL_MAX_LEN else None
    block_n, warps, stages, fused = _config((*ring, True) if ring else DENSE_CONFIG)
    fused = fused or small
    n_splits, split_size = plan_splits(max_len, q.shape[0] * k_cache.shape[2], sms, block_n, DENSE_WAVES)
    o_part, lse_part, counters = buffers(q, k_cache.shape[2], n_splits)
    launch_decode(q, k_cache, v_cache, None, block_table, seq_lens, sm_scale, max_len, n_splits, split_size,
                  o_part, lse_part, counters, out, sparse=False, block_n=block_n, num_warps=warps,
                  num_stages=stages, fused_merge=fused, pdl=pdl, kv_before_wait=kv_before_wait, fresh=fresh,
                  l2_next=l2_next)
