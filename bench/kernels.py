"""Microbenchmark of the CLSA decode kernels against torch baselines, on clsa-4b shapes.

For each context length N and batch B, on a paged cache (block_size 16, physical blocks in a random
order, fresh random data) it measures:

1. ``index_topk`` (indexer scores over the paged k_idx cache, then top-k) vs torch scoring over a
   contiguous k_idx + ``torch.topk``, and ``torch.topk`` alone on precomputed scores;
2. ``sparse_decode_attention``, one layer, through ``SparseDecodeWrapper`` (plan outside the timed
   region, ``run`` timed) vs torch gather of the k rows + SDPA, and SDPA alone;
3. 16 cross layers back to back on one ``indices`` (one plan, 16 runs), eagerly and as a CUDA graph;
4. ``dense_decode_attention`` vs SDPA (flash) over a contiguous cache.

It also measures the card's bandwidth (device copy; read-only reductions, the reference for %readBW),
the whole CLSA step (index_topk + 16 layers) against 16 dense SDPA layers, and the issue's targets
at N=128K with PASS/MISS. Every op is checked against its baseline before it is timed; a failed
check is marked FAIL in the table and does not stop the run.

Timing: median of triton.testing.do_bench (L2 cleared before every rep), both of the plain call
("eager") and of a CUDA-graph replay of it; the graph time is the figure of merit (GPU time without
Python launch overhead, as a graph-captured decode step runs), eager is shown beside it.

GPU (about 35 s on H200): python bench/kernels.py --out bench/results
CPU smoke (tiny sizes): TRITON_INTERPRET=1 python bench/kernels.py --smoke --out /tmp/bench_smoke
Subsets:                --only topk --only dense   --ns 8K 32K   --bs 1 8   --block-size 32
With the wide sparse kernel where its sweep found it faster (bench/sweep_kernels.py --wide):
                        --wide-from DIR/sparse_wide.json
Writes DIR/kernels.json (every number) and DIR/kernels.txt (the printed report).
"""

from __future__ import annotations

import argparse
import ast
import gc
import importlib
import json
import math
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

try:
    import triton
    import triton.testing
except ImportError:  # the CPU smoke run still works without Triton
    triton = None  # type: ignore[assignment]

OPS = ("topk", "sparse", "layers", "dense")
FULL_NS = (8192, 32768, 131072)
FULL_BS = (1, 8, 32)
SMOKE_NS = (100, 300)
SMOKE_BS = (1, 3)
LAYERS = 16
TARGET_N = 131072
ATTN_REL_TOL = 2e-2
TOPK_MIN_OVERLAP = 0.99
LAYER_CACHE_BUDGET = 16 * 2**30  # bytes of extra per-layer K/V caches in the 16-layer run
BW_TENSOR_BYTES = 4 * 2**30
# Bare reads the size of one sparse layer's K/V rows at B = 1, 8, 32 (8 MiB a sequence), timed as the ops are
SIZED_READ_BYTES = (8 * 2**20, 64 * 2**20, 256 * 2**20)
WARMUP_MS = 25
REP_MS = 100
CPU_REPS = 3


# ----------------------------------------------------------------------------------------------
# Shapes, output, timing
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """Model dimensions of one benchmark run (every config shares them)."""

    hq: int
    hkv: int
    d: int
    d_idx: int
    k: int
    dtype: torch.dtype
    block_size: int

    @property
    def group(self) -> int:
        return self.hq // self.hkv

    @property
    def esize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def sm_scale(self) -> float:
        return self.d**-0.5


def clsa_4b_shape(block_size: int) -> Shape:
    return Shape(hq=24, hkv=8, d=128, d_idx=128, k=2048, dtype=torch.bfloat16, block_size=block_size)


def smoke_shape(block_size: int) -> Shape:
    return Shape(hq=4, hkv=2, d=32, d_idx=32, k=16, dtype=torch.float32, block_size=block_size)


class Report:
    """Prints to stdout (flushed) and keeps the text for kernels.txt; progress goes to stderr."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.start = time.perf_counter()

    def line(self, text: str = "") -> None:
        print(text, flush=True)
        self.lines.append(text)

    def progress(self, text: str) -> None:
        print(f"[bench {time.perf_counter() - self.start:6.1f}s] {text}", file=sys.stderr, flush=True)

    def alert(self, text: str) -> None:
        """A loud, unmissable message (the GPU run must not degrade silently)."""
        bar = "!" * 100
        for line in (bar, f"!!! {text}", bar):
            self.line(line)
            print(line, file=sys.stderr, flush=True)

    def elapsed_s(self) -> float:
        return time.perf_counter() - self.start


@dataclass
class Timing:
    """One callable timed eagerly and as a CUDA graph replay."""

    eager_us: float
    graph_us: float | None = None
    why: str = ""  # why there is no graph time

    @property
    def us(self) -> float:
        """The figure of merit: graph replay (GPU time without Python launch overhead), else eager."""
        return self.graph_us if self.graph_us is not None else self.eager_us

    @property
    def eager_only(self) -> bool:
        """True when a CUDA run fell back to the eager time (capture failed)."""
        return self.graph_us is None and self.why not in ("", "no CUDA")

    def times(self, factor: int) -> Timing:
        graph = None if self.graph_us is None else factor * self.graph_us
        return Timing(factor * self.eager_us, graph, self.why)


class Timer:
    """Median time of a callable: triton's do_bench on CUDA (it clears L2 before every rep),
    CUDA events when Triton is missing, time.perf_counter on CPU."""

    def __init__(self, device: torch.device, rep_ms: int) -> None:
        self.device = device
        self.rep_ms = rep_ms

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def us(self, fn: Callable[[], Any]) -> float:
        if not self.cuda:
            return self._cpu_ms(fn) * 1e3
        if triton is not None:
            return float(triton.testing.do_bench(fn, warmup=WARMUP_MS, rep=self.rep_ms, return_mode="median")) * 1e3
        return self._event_ms(fn) * 1e3

    @staticmethod
    def _cpu_ms(fn: Callable[[], Any]) -> float:
        fn()
        times = []
        for _ in range(CPU_REPS):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1e3

    @staticmethod
    def _event_ms(fn: Callable[[], Any], warmup: int = 10, reps: int = 50) -> float:
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)

    def capture(self, fn: Callable[[], Any]) -> tuple[torch.cuda.CUDAGraph | None, Any, str]:
        """(graph, its static outputs, "") or (None, None, why). Warms up on a side stream first."""
        if not self.cuda:
            return None, None, "no CUDA"
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    fn()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = fn()
            graph.replay()
            torch.cuda.synchronize()
            return graph, out, ""
        except Exception as exc:  # capture of a host-syncing op fails; report, don't abort
            _try_sync()
            return None, None, f"capture failed: {short_error(exc)}"

    def graph_us(self, fn: Callable[[], Any]) -> tuple[float | None, str]:
        graph, _, why = self.capture(fn)
        if graph is None:
            return None, why
        us = self.us(graph.replay)
        del graph
        return us, ""

    def time(self, fn: Callable[[], Any]) -> Timing:
        eager = self.us(fn)
        graph, why = self.graph_us(fn)
        return Timing(eager, graph, why)


def _try_sync() -> None:
    try:
        torch.cuda.synchronize()
    except Exception:
        pass


def short_error(exc: BaseException) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first[:160]}"


def free_device_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------
# The kernels package (imported by path: this file is itself named kernels.py)
# ----------------------------------------------------------------------------------------------


@dataclass
class Api:
    """The ops under test."""

    index_topk: Callable[..., torch.Tensor]
    dense: Callable[..., torch.Tensor]
    wrapper_cls: type


def import_kernels() -> ModuleType:
    """Import the repo's `kernels` package, not this script (bench/ is sys.path[0] when run as a file)."""
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    sys.path.insert(0, str(here.parent))
    return importlib.import_module("kernels")


def load_api() -> Api:
    mod = import_kernels()
    return Api(mod.index_topk, mod.dense_decode_attention, mod.SparseDecodeWrapper)


# ----------------------------------------------------------------------------------------------
# Data: contiguous per-sequence tensors scattered into a paged cache through a permuted block table
# ----------------------------------------------------------------------------------------------


@dataclass
class Case:
    """One (N, B) configuration: contiguous tensors for the baselines, paged ones for our kernels."""

    n: int
    b: int
    shape: Shape
    q: torch.Tensor  # [B, Hq, d]
    q_idx: torch.Tensor  # [B, d_idx]
    k: torch.Tensor  # [B, N, Hkv, d] contiguous
    v: torch.Tensor
    k_idx: torch.Tensor  # [B, N, d_idx] contiguous
    k_cache: torch.Tensor  # [num_blocks, block_size, Hkv, d]
    v_cache: torch.Tensor
    k_idx_cache: torch.Tensor  # [num_blocks, block_size, d_idx]
    block_table: torch.Tensor  # [B, max_blocks] int32
    seq_lens: torch.Tensor  # [B] int32
    ref_scores: torch.Tensor  # [B, N] fp32 indexer scores
    indices: torch.Tensor  # [B, k] int32: top-k of ref_scores (score order)
    flat_indices: torch.Tensor  # [B * k] int64 rows of k.view(B * N, Hkv, d)
    memo: dict[str, Timing] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return self.q.device


def random_block_table(b: int, n: int, block_size: int, device: torch.device) -> torch.Tensor:
    blocks_per_seq = math.ceil(n / block_size)
    perm = torch.randperm(b * blocks_per_seq, device=device)
    return perm.view(b, blocks_per_seq).to(torch.int32)


def to_paged(contig: torch.Tensor, block_table: torch.Tensor, block_size: int) -> torch.Tensor:
    """Scatter `[B, N, *feat]` into `[num_blocks, block_size, *feat]` through `block_table`."""
    b, n, *feat = contig.shape
    blocks_per_seq = block_table.shape[1]
    pad = blocks_per_seq * block_size - n
    if pad:
        filler = torch.randn(b, pad, *feat, dtype=contig.dtype, device=contig.device)
        contig = torch.cat([contig, filler], dim=1)
    paged = torch.empty(b * blocks_per_seq, block_size, *feat, dtype=contig.dtype, device=contig.device)
    paged[block_table.flatten().long()] = contig.reshape(b * blocks_per_seq, block_size, *feat)
    return paged


def reference_scores(q_idx: torch.Tensor, k_idx: torch.Tensor) -> torch.Tensor:
    """fp32 scores from the same (bf16) keys, one sequence at a time to bound the fp32 copy."""
    return torch.stack([k_idx[i].float() @ q_idx[i].float() for i in range(q_idx.shape[0])])


def build_case(shape: Shape, n: int, b: int, device: torch.device) -> Case:
    def randn(*size: int) -> torch.Tensor:
        return torch.randn(*size, dtype=shape.dtype, device=device)

    k, v, k_idx = randn(b, n, shape.hkv, shape.d), randn(b, n, shape.hkv, shape.d), randn(b, n, shape.d_idx)
    q_idx = randn(b, shape.d_idx)
    table = random_block_table(b, n, shape.block_size, device)
    scores = reference_scores(q_idx, k_idx)
    indices = scores.topk(min(shape.k, n), dim=1).indices
    offsets = torch.arange(b, device=device)[:, None] * n
    return Case(
        n=n, b=b, shape=shape, q=randn(b, shape.hq, shape.d), q_idx=q_idx, k=k, v=v, k_idx=k_idx,
        k_cache=to_paged(k, table, shape.block_size), v_cache=to_paged(v, table, shape.block_size),
        k_idx_cache=to_paged(k_idx, table, shape.block_size), block_table=table,
        seq_lens=torch.full((b,), n, dtype=torch.int32, device=device), ref_scores=scores,
        indices=indices.to(torch.int32), flat_indices=(indices + offsets).flatten(),
    )


# ----------------------------------------------------------------------------------------------
# Baselines and checks
# ----------------------------------------------------------------------------------------------


def torch_score_topk(q_idx: torch.Tensor, k_idx: torch.Tensor, k: int) -> torch.Tensor:
    """Baseline: einsum over the contiguous k_idx in its dtype, scores to fp32, torch.topk."""
    scores = torch.einsum("bd,bnd->bn", q_idx, k_idx).float()
    return torch.topk(scores, k, dim=1).indices


def gather_rows(case: Case, cache: torch.Tensor) -> torch.Tensor:
    """The selected rows of a contiguous `[B, N, Hkv, d]` tensor as `[B, Hkv, k, d]` (a strided view)."""
    b, n, hkv, d = cache.shape
    rows = cache.view(b * n, hkv, d).index_select(0, case.flat_indices)
    return rows.view(b, -1, hkv, d).transpose(1, 2)


def grouped_q(q: torch.Tensor, shape: Shape) -> torch.Tensor:
    """GQA as `G` query rows per KV head: `[B, Hq, d]` -> `[B, Hkv, G, d]`."""
    return q.view(q.shape[0], shape.hkv, shape.group, shape.d)


def gather_sdpa(case: Case, q: torch.Tensor) -> torch.Tensor:
    """Baseline sparse attention: gather the k rows of K and V, then SDPA (default backend, no mask)."""
    out = F.scaled_dot_product_attention(
        grouped_q(q, case.shape), gather_rows(case, case.k), gather_rows(case, case.v), scale=case.shape.sm_scale
    )
    return out.reshape(q.shape)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, flash: bool) -> torch.Tensor:
    if not flash:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, scale=scale)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.float()
    return float((out.float() - ref).norm() / ref.norm().clamp_min(1e-30))


def attention_check(out: torch.Tensor, ref: torch.Tensor) -> tuple[str, bool]:
    err = rel_err(out, ref)
    ok = math.isfinite(err) and err < ATTN_REL_TOL
    return f"{'ok' if ok else 'FAIL'} err={err:.1e}", ok


def topk_overlap(ours: torch.Tensor, ref: torch.Tensor, n: int) -> float:
    """Smallest per-row fraction of `ref` positions that `ours` also selected (duplicates count once)."""
    chosen = torch.zeros(ours.shape[0], n + 1, dtype=torch.bool, device=ours.device)
    valid = (ours >= 0) & (ours < n)
    chosen.scatter_(1, torch.where(valid, ours.long(), n), True)
    hits = chosen.gather(1, ref.long()).sum(dim=1)
    return float((hits.float() / ref.shape[1]).min())


def topk_check(ours: torch.Tensor, case: Case) -> tuple[str, bool]:
    k = min(case.shape.k, case.n)
    if tuple(ours.shape) != (case.b, case.shape.k) or ours.dtype != torch.int32:
        return f"FAIL shape {tuple(ours.shape)} {ours.dtype}", False
    overlap = topk_overlap(ours[:, :k] if k < ours.shape[1] else ours, case.indices, case.n)
    ok = overlap >= TOPK_MIN_OVERLAP
    return f"{'ok' if ok else 'FAIL'} overlap={overlap:.4f}", ok


# ----------------------------------------------------------------------------------------------
# Rows
# ----------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One table line: ours vs baseline (each eager and as a CUDA graph), credited with the same bytes."""

    op: str
    n: int
    b: int
    backend: str
    bytes: int
    ours: Timing | None = None
    baseline: Timing | None = None
    check: str = "-"
    ok: bool | None = None
    notes: dict[str, Any] = field(default_factory=dict)
    error: str = ""

    @property
    def ours_us(self) -> float | None:
        return self.ours.us if self.ours else None

    @property
    def baseline_us(self) -> float | None:
        return self.baseline.us if self.baseline else None

    def gbps(self, us: float | None) -> float | None:
        return self.bytes / (us * 1e-6) / 1e9 if us else None

    def pct(self, us: float | None, read_bw: float | None) -> float | None:
        gbps = self.gbps(us)
        return 100.0 * gbps / read_bw if gbps is not None and read_bw else None

    def speedup(self) -> float | None:
        return self.baseline_us / self.ours_us if self.ours_us and self.baseline_us else None

    def to_json(self, read_bw: float | None) -> dict[str, Any]:
        data = asdict(self)
        data.update(
            ours_us=self.ours_us, ours_gbps=self.gbps(self.ours_us), ours_pct_read_bw=self.pct(self.ours_us, read_bw),
            baseline_us=self.baseline_us, baseline_gbps=self.gbps(self.baseline_us), speedup=self.speedup(),
        )
        return data


# ----------------------------------------------------------------------------------------------
# Benchmark context, backend availability
# ----------------------------------------------------------------------------------------------


@dataclass
class Ctx:
    """What every op benchmark needs: the API, timer, shape, the backends that work, the report."""

    api: Api
    timer: Timer
    shape: Shape
    device: torch.device
    report: Report
    backends: list[str]
    available: dict[str, dict[str, str]] = field(default_factory=dict)  # backend -> op -> "ok" | why
    read_bw: float | None = None

    def backends_for(self, op: str) -> list[str]:
        probe_op = "sparse" if op == "layers" else op
        return [be for be in self.backends if self.available.get(be, {}).get(probe_op) == "ok"]


@dataclass
class SparseRunner:
    """One sparse layer: `run(q, k_cache, v_cache)` with the plan already made."""

    run: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _wrapper_run(wrapper: Any, scale: float, q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor) -> torch.Tensor:
    return wrapper.run(q, kc, vc, scale)


def make_sparse_runner(api: Api, case: Case, backend: str) -> SparseRunner:
    """SparseDecodeWrapper planned once (here) for the case's indices; `run` per layer."""
    wrapper = api.wrapper_cls(backend=backend)
    wrapper.plan(case.block_table, case.seq_lens, case.indices, case.shape.block_size)
    return SparseRunner(partial(_wrapper_run, wrapper, case.shape.sm_scale))


def probe_backend(api: Api, shape: Shape, device: torch.device, backend: str) -> dict[str, str]:
    """Run every op once on a tiny case: op -> "ok" or the error."""
    n = max(2 * shape.k, 4 * shape.block_size)
    case = build_case(shape, math.ceil(n / shape.block_size) * shape.block_size, 2, device)
    calls: dict[str, Callable[[], Any]] = {
        "topk": lambda: api.index_topk(case.q_idx, case.k_idx_cache, case.block_table, case.seq_lens, shape.k,
                                       backend=backend),
        "sparse": lambda: make_sparse_runner(api, case, backend).run(case.q, case.k_cache, case.v_cache),
        "dense": lambda: api.dense(case.q, case.k_cache, case.v_cache, case.block_table, case.seq_lens,
                                   shape.sm_scale, backend=backend),
    }
    status: dict[str, str] = {}
    for op, call in calls.items():
        try:
            call()
            status[op] = "ok"
        except Exception as exc:
            status[op] = short_error(exc)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return status


def report_availability(ctx: Ctx) -> None:
    """One line per backend; 'triton: available/unavailable'; loud on the GPU when anything is missing."""
    for backend in ctx.backends:
        ctx.available[backend] = probe_backend(ctx.api, ctx.shape, ctx.device, backend)
    for backend, status in ctx.available.items():
        ops = "; ".join(f"{op}: {status[op]}" for op in ("topk", "sparse", "dense"))
        ctx.report.line(f"backend {backend}: {ops}")
    triton_status = ctx.available.get("triton", {})
    missing = [op for op in ("topk", "sparse", "dense") if triton_status.get(op) != "ok"]
    ctx.report.line(f"triton: {'available' if not missing else 'unavailable (' + ', '.join(missing) + ')'}")
    if ctx.device.type != "cuda":
        return
    if missing:
        ctx.report.alert(f"TRITON PATH UNAVAILABLE ON THE GPU for {missing}: 'ours' columns will be n/a")


# ----------------------------------------------------------------------------------------------
# Measuring "ours"
# ----------------------------------------------------------------------------------------------


def measure_ours(ctx: Ctx, row: Row, fn: Callable[[], Any], check: Callable[[Any], tuple[str, bool]]) -> None:
    """Check once, then time eagerly and as a CUDA graph; an exception becomes the row's error."""
    try:
        row.check, row.ok = check(fn())
        row.ours = ctx.timer.time(fn)
        if row.ours.eager_only:
            row.notes["graph"] = row.ours.why
    except Exception as exc:
        row.error = short_error(exc)
        row.check, row.ok = "ERROR", False
        if ctx.timer.cuda:
            _try_sync()
        ctx.report.alert(f"{row.op} N={row.n} B={row.b} backend={row.backend}: {row.error}")
        traceback.print_exc(file=sys.stderr)


def rows_for(ctx: Ctx, op: str, case: Case, nbytes: int, baseline: Timing) -> list[Row]:
    """One row per working backend (or a single n/a row when none works)."""
    backends = ctx.backends_for(op) or ["-"]
    rows = [Row(op, case.n, case.b, be, nbytes, baseline=baseline) for be in backends]
    for row in rows:
        if row.backend == "-":
            row.error, row.check = "no working backend (see availability)", "n/a"
    return rows


# ----------------------------------------------------------------------------------------------
# The four op benchmarks
# ----------------------------------------------------------------------------------------------


def topk_bytes(case: Case) -> int:
    s = case.shape
    keys, query = case.b * case.n * s.d_idx * s.esize, case.b * s.d_idx * s.esize
    return keys + query + case.b * s.k * 4 + case.block_table.numel() * 4


def sparse_bytes(case: Case) -> int:
    s = case.shape
    return case.b * s.k * s.hkv * s.d * s.esize * 2 + 2 * case.b * s.hq * s.d * s.esize + case.b * s.k * 4


def dense_bytes(case: Case) -> int:
    s = case.shape
    return case.b * case.n * s.hkv * s.d * s.esize * 2 + 2 * case.b * s.hq * s.d * s.esize


def bench_topk(ctx: Ctx, case: Case) -> list[Row]:
    k = case.shape.k
    baseline = ctx.timer.time(partial(torch_score_topk, case.q_idx, case.k_idx, k))
    topk_only_us = ctx.timer.time(partial(torch.topk, case.ref_scores, k, 1)).us
    rows = rows_for(ctx, "topk", case, topk_bytes(case), baseline)
    for row in rows:
        row.notes["topk_only_us"] = topk_only_us
        if row.backend != "-":
            fn = partial(ctx.api.index_topk, case.q_idx, case.k_idx_cache, case.block_table, case.seq_lens, k,
                         backend=row.backend)
            measure_ours(ctx, row, fn, partial(_topk_check_out, case=case))
    return rows


def _topk_check_out(out: torch.Tensor, case: Case) -> tuple[str, bool]:
    return topk_check(out, case)


def one_layer_baseline(ctx: Ctx, case: Case) -> Timing:
    if "gather_sdpa" not in case.memo:
        case.memo["gather_sdpa"] = ctx.timer.time(partial(gather_sdpa, case, case.q))
    return case.memo["gather_sdpa"]


def bench_sparse(ctx: Ctx, case: Case) -> list[Row]:
    ref = gather_sdpa(case, case.q)
    kg, vg = gather_rows(case, case.k).contiguous(), gather_rows(case, case.v).contiguous()
    sdpa_only = partial(sdpa, grouped_q(case.q, case.shape), kg, vg, case.shape.sm_scale, False)
    sdpa_only_us = ctx.timer.time(sdpa_only).us
    del kg, vg, sdpa_only
    rows = rows_for(ctx, "sparse", case, sparse_bytes(case), one_layer_baseline(ctx, case))
    for row in rows:
        row.notes["sdpa_only_us"] = sdpa_only_us
        if row.backend != "-":
            runner = make_sparse_runner(ctx.api, case, row.backend)
            measure_ours(ctx, row, partial(runner.run, case.q, case.k_cache, case.v_cache),
                         partial(attention_check, ref=ref))
    return rows


def distinct_layer_caches(case: Case) -> int:
    """How many different K/V caches the 16 layers cycle through: all 16 when they fit the budget,
    so that small-B runs do not read later layers' rows from L2."""
    per_layer = 2 * case.k_cache.numel() * case.k_cache.element_size()
    return max(1, min(LAYERS, 1 + LAYER_CACHE_BUDGET // per_layer))


def layer_caches(case: Case) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Layer 0 uses the case's cache (its contiguous copy exists); others get fresh random caches
    under the same block table."""
    extra = [(torch.randn_like(case.k_cache), torch.randn_like(case.v_cache))
             for _ in range(distinct_layer_caches(case) - 1)]
    return [(case.k_cache, case.v_cache), *extra]


def run_layers(runner: SparseRunner, qs: torch.Tensor, caches: list[tuple[torch.Tensor, torch.Tensor]]
               ) -> list[torch.Tensor]:
    return [runner.run(qs[i], *caches[i % len(caches)]) for i in range(LAYERS)]


def bench_layers(ctx: Ctx, case: Case) -> list[Row]:
    caches = layer_caches(case)
    qs = torch.randn(LAYERS, case.b, case.shape.hq, case.shape.d, dtype=case.shape.dtype, device=case.device)
    ref0 = gather_sdpa(case, qs[0])
    rows = rows_for(ctx, "layers", case, LAYERS * sparse_bytes(case), one_layer_baseline(ctx, case).times(LAYERS))
    for row in rows:
        row.notes["distinct_caches"] = len(caches)
        if row.backend != "-":
            measure_layers(ctx, row, make_sparse_runner(ctx.api, case, row.backend), qs, caches, ref0)
    return rows


def measure_layers(ctx: Ctx, row: Row, runner: SparseRunner, qs: torch.Tensor,
                   caches: list[tuple[torch.Tensor, torch.Tensor]], ref0: torch.Tensor) -> None:
    """Plan once (in `runner`), 16 runs: eager time, then one CUDA graph of the 16 runs and its time."""
    step = partial(run_layers, runner, qs, caches)
    try:
        eager = step()
        row.check, row.ok = attention_check(eager[0], ref0)
        row.ours = Timing(ctx.timer.us(step))
        graph, graph_out, row.ours.why = ctx.timer.capture(step)
        if graph is None:
            if row.ours.eager_only:
                row.notes["graph"] = row.ours.why
            return
        graph.replay()
        graph_err = rel_err(torch.stack(graph_out), torch.stack(eager))
        row.check += f" graph_err={graph_err:.1e}"
        row.ok = row.ok and graph_err < ATTN_REL_TOL
        row.ours.graph_us = ctx.timer.us(graph.replay)
        del graph, graph_out
    except Exception as exc:
        row.error, row.check, row.ok = short_error(exc), "ERROR", False
        ctx.report.alert(f"layers N={row.n} B={row.b} backend={row.backend}: {row.error}")
        traceback.print_exc(file=sys.stderr)


def flash_usable(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> bool:
    try:
        sdpa(q, k, v, scale, flash=True)
        return True
    except RuntimeError:
        return False


def bench_dense(ctx: Ctx, case: Case) -> list[Row]:
    qg = grouped_q(case.q, case.shape)
    kt, vt = case.k.transpose(1, 2).contiguous(), case.v.transpose(1, 2).contiguous()  # [B, Hkv, N, d]
    flash = flash_usable(qg, kt, vt, case.shape.sm_scale)
    baseline = partial(sdpa, qg, kt, vt, case.shape.sm_scale, flash)
    ref = baseline().reshape(case.q.shape)
    rows = rows_for(ctx, "dense", case, dense_bytes(case), ctx.timer.time(baseline))
    del kt, vt, baseline
    for row in rows:
        row.notes["sdpa_backend"] = "flash" if flash else "default (flash refused)"
        if row.backend != "-":
            fn = partial(ctx.api.dense, case.q, case.k_cache, case.v_cache, case.block_table, case.seq_lens,
                         case.shape.sm_scale, backend=row.backend)
            measure_ours(ctx, row, fn, partial(attention_check, ref=ref))
    return rows


BENCHES: dict[str, Callable[[Ctx, Case], list[Row]]] = {
    "topk": bench_topk, "sparse": bench_sparse, "layers": bench_layers, "dense": bench_dense,
}


# ----------------------------------------------------------------------------------------------
# Bandwidth reference
# ----------------------------------------------------------------------------------------------


def measure_bandwidth(timer: Timer, device: torch.device) -> dict[str, float]:
    """(a) device-to-device copy, bytes read + written / time; (b) read-only reductions (sum, amax)
    over a 4 GiB bf16 tensor. read_bw = the better of (b): the reference for %readBW."""
    numel = BW_TENSOR_BYTES // 2
    src = torch.randn(numel, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    copy_us = timer.us(partial(dst.copy_, src))
    del dst
    sum_us = timer.us(src.sum)
    amax_us = timer.us(src.amax)
    sized = {nbytes: sized_read_us(timer, src[: nbytes // 2]) for nbytes in SIZED_READ_BYTES}
    layer = SIZED_READ_BYTES[0] // 2
    chain = sized_read_us(timer, *(src[i * layer: (i + 1) * layer] for i in range(LAYERS)))
    del src
    free_device_memory()
    gbps = {name: nbytes / (us * 1e-6) / 1e9 for name, nbytes, us in (
        ("copy_gbps", 2 * BW_TENSOR_BYTES, copy_us), ("sum_gbps", BW_TENSOR_BYTES, sum_us),
        ("amax_gbps", BW_TENSOR_BYTES, amax_us))}
    return {**gbps, "read_bw_gbps": max(gbps["sum_gbps"], gbps["amax_gbps"]), "tensor_bytes": BW_TENSOR_BYTES,
            "sized_read_us": {n: us for n, us in sized.items() if us is not None},
            "chain_read_us": chain, "chain_read_bytes": SIZED_READ_BYTES[0]}


def sized_read_us(timer: Timer, *parts: torch.Tensor) -> float | None:
    """A CUDA-graph replay of the better of sum / amax over each of `parts` in turn (one kernel
    each, back to back), timed as every op is (L2 cleared first): what reading those bytes costs
    alone, launches and ramp-up included."""
    times = []
    for name in ("sum", "amax"):
        graph, _, _ = timer.capture(lambda name=name: [getattr(part, name)() for part in parts])
        if graph is not None:
            times.append(timer.us(graph.replay))
    return min(times) if times else None


# ----------------------------------------------------------------------------------------------
# Tables, targets, the step ratio
# ----------------------------------------------------------------------------------------------

TITLES = {
    "topk": "index_topk (ours, paged) vs torch einsum(contiguous k_idx)->fp32 + torch.topk",
    "sparse": "sparse_decode_attention, one layer (ours: wrapper.run, plan outside) vs torch gather + SDPA",
    "layers": f"{LAYERS} layers back to back on one indices (ours: 1 plan + {LAYERS} runs) "
              f"vs {LAYERS} x one-layer gather + SDPA",
    "dense": "dense_decode_attention (ours, paged) vs SDPA flash over contiguous [B, Hkv, N, d]",
}
HEADER = ("N", "B", "backend", "ours_us", "ours_GB/s", "%readBW", "baseline_us", "baseline_GB/s", "speedup",
          "ours_eager_us", "base_eager_us", "check", "notes")


def fmt(value: float | None, digits: int = 1, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:.{digits}f}{suffix}"


def fmt_us(timing: Timing | None) -> str:
    """The primary time; an 'e' marks an eager time standing in for a failed graph capture."""
    return "n/a" if timing is None else f"{timing.us:.1f}" + ("e" if timing.eager_only else "")


def fmt_n(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def fmt_notes(row: Row) -> str:
    parts = [f"{k}={fmt(v) if isinstance(v, float) else v}" for k, v in row.notes.items()]
    if row.error:
        parts.append(f"error={row.error}")
    return " ".join(parts)


def row_cells(row: Row, read_bw: float | None) -> tuple[str, ...]:
    return (fmt_n(row.n), str(row.b), row.backend, fmt_us(row.ours), fmt(row.gbps(row.ours_us), 0),
            fmt(row.pct(row.ours_us, read_bw)), fmt_us(row.baseline), fmt(row.gbps(row.baseline_us), 0),
            fmt(row.speedup(), 2, "x"), fmt(row.ours.eager_us if row.ours else None),
            fmt(row.baseline.eager_us if row.baseline else None), row.check, fmt_notes(row))


def table(rows: list[Row], read_bw: float | None) -> list[str]:
    cells = [HEADER] + [row_cells(r, read_bw) for r in sorted(rows, key=lambda r: (r.n, r.b, r.backend))]
    widths = [max(len(c[i]) for c in cells) for i in range(len(HEADER) - 1)]
    return ["  ".join(c[i].rjust(w) for i, w in enumerate(widths)) + "  " + c[-1] for c in cells]


def print_tables(report: Report, rows: list[Row], read_bw: float | None) -> None:
    for op in OPS:
        op_rows = [r for r in rows if r.op == op]
        if op_rows:
            report.line()
            report.line(f"== {TITLES[op]}")
            for text in table(op_rows, read_bw):
                report.line(text)


def find_row(rows: list[Row], op: str, n: int, b: int) -> Row | None:
    """The row to judge: triton when present, else any backend that produced a time."""
    matches = [r for r in rows if (r.op, r.n, r.b) == (op, n, b)]
    matches.sort(key=lambda r: (r.backend != "triton", r.ours is None))
    return matches[0] if matches else None


@dataclass
class Target:
    name: str
    measured: str
    goal: str
    verdict: str


def verdict(value: float | None, passed: bool, row: Row | None) -> str:
    if value is None or row is None:
        return "n/a"
    if row.ok is False:
        return "MISS (check FAIL)"
    return "PASS" if passed else "MISS"


def with_eager(row: Row | None) -> str:
    if row is None or row.ours is None:
        return ""
    return f" (eager {row.ours.eager_us:.1f} us)" if not row.ours.eager_only else " (eager: graph capture failed)"


def sparse_targets(rows: list[Row], n: int, bs: list[int], read_bw: float | None,
                   sized: dict[int, float] | None = None) -> list[Target]:
    """B >= 8; with `sized` (bytes -> us of a bare read that size), also how the layer compares with
    reading its bytes contiguously, launch included."""
    out = []
    for b in [b for b in bs if b >= 8]:
        row = find_row(rows, "sparse", n, b)
        pct = row.pct(row.ours_us, read_bw) if row else None
        measured = fmt(pct, 1, "% of read BW") + (f" ({fmt_us(row.ours)} us)" if row else "")
        near = [(nbytes, us) for nbytes, us in (sized or {}).items() if row and abs(nbytes - row.bytes) < 0.05 * nbytes]
        if near and read_bw:
            nbytes, us = near[0]
            measured += (f"; a bare read of {nbytes / 2**20:.0f} MiB: {us:.1f} us = "
                         f"{100 * nbytes / (us * 1e-6) / 1e9 / read_bw:.1f}%")
        out.append(Target(f"sparse one layer B={b}", measured, ">= 75%",
                          verdict(pct, pct is not None and pct >= 75.0, row)))
    return out


def layers_targets(rows: list[Row], n: int, chain_read_us: float | None = None) -> list[Target]:
    """With `chain_read_us` (16 bare reads of one layer's bytes back to back), that floor beside it."""
    row = find_row(rows, "layers", n, 1)
    us = row.ours.graph_us if row and row.ours else None
    floor = f"; {LAYERS} bare reads of its bytes: {chain_read_us:.1f} us" if chain_read_us else ""
    return [Target(f"{LAYERS} layers B=1, CUDA graph", fmt(us, 1, " us") + with_eager(row) + floor, "< 60 us",
                   verdict(us, us is not None and us < 60.0, row))]


def topk_targets(rows: list[Row], n: int) -> list[Target]:
    row1, row32 = find_row(rows, "topk", n, 1), find_row(rows, "topk", n, 32)
    us1, us32 = (r.ours_us if r else None for r in (row1, row32))
    sp = row1.speedup() if row1 else None
    return [
        Target("index_topk B=1", fmt(us1, 1, " us") + with_eager(row1), "< 25 us",
               verdict(us1, bool(us1 and us1 < 25), row1)),
        Target("index_topk B=1 vs torch scoring + topk", fmt(sp, 2, "x"), ">= 3x",
               verdict(sp, bool(sp and sp >= 3.0), row1)),
        Target("index_topk B=32", fmt(us32, 1, " us") + with_eager(row32), "< 300 us",
               verdict(us32, bool(us32 and us32 < 300), row32)),
    ]


def dense_targets(rows: list[Row], n: int, bs: list[int]) -> list[Target]:
    out = []
    for b in bs:
        row = find_row(rows, "dense", n, b)
        ratio = row.speedup() if row else None
        detail = f"{fmt(ratio, 2)} of SDPA speed ({fmt_us(row.ours)} vs {fmt_us(row.baseline)} us)" if row else ""
        out.append(Target(f"dense decode B={b}", detail if ratio else "n/a", ">= 0.90 (ours <= sdpa / 0.9)",
                          verdict(ratio, bool(ratio and ratio >= 0.9), row)))
    return out


def evaluate_targets(rows: list[Row], ns: list[int], bs: list[int], read_bw: float | None,
                     bandwidth: dict[str, Any] | None = None) -> tuple[int, list[Target]]:
    """Verdicts at the target N; `bandwidth` (measure_bandwidth's) adds the bare-read floors."""
    n = TARGET_N if TARGET_N in ns else max(ns)
    bw = bandwidth or {}
    targets = (sparse_targets(rows, n, bs, read_bw, bw.get("sized_read_us"))
               + layers_targets(rows, n, bw.get("chain_read_us")) + topk_targets(rows, n))
    return n, targets + dense_targets(rows, n, bs)


def print_targets(report: Report, n: int, targets: list[Target]) -> None:
    report.line()
    note = "" if n == TARGET_N else f"  (N={fmt_n(n)} is not the target N=128K: verdicts are not meaningful)"
    report.line(f"== Targets at N={fmt_n(n)}, on the primary (CUDA-graph) times{note}")
    width = max(len(t.name) for t in targets)
    for t in targets:
        report.line(f"  {t.verdict:<17} {t.name:<{width}}  measured {t.measured}  goal {t.goal}")


def step_ratios(rows: list[Row], ns: list[int], bs: list[int]) -> list[dict[str, Any]]:
    """Whole CLSA step (index_topk + 16 sparse layers) vs 16 dense SDPA layers, on primary times."""
    out = []
    for n in ns:
        for b in [b for b in (1, 8) if b in bs]:
            topk, layers, dense = (find_row(rows, op, n, b) for op in ("topk", "layers", "dense"))
            if not (topk and layers and dense and topk.ours_us and layers.ours_us and dense.baseline_us):
                continue
            clsa_us = topk.ours_us + layers.ours_us
            dense_us = LAYERS * dense.baseline_us
            out.append({"n": n, "b": b, "topk_us": topk.ours_us, "layers_us": layers.ours_us, "clsa_us": clsa_us,
                        "dense16_sdpa_us": dense_us, "dense_over_clsa": dense_us / clsa_us})
    return out


def print_step_ratios(report: Report, ratios: list[dict[str, Any]]) -> None:
    report.line()
    report.line(f"== Whole step (attention only): index_topk + {LAYERS} sparse layers vs {LAYERS} dense SDPA layers")
    if not ratios:
        report.line("  (needs topk, layers and dense at B=1 or B=8)")
    for r in ratios:
        report.line(f"  N={fmt_n(r['n']):>5} B={r['b']:<2}  CLSA {r['clsa_us']:9.1f} us (topk {r['topk_us']:.1f} + "
                    f"layers {r['layers_us']:.1f})  dense {r['dense16_sdpa_us']:10.1f} us  "
                    f"ratio dense/CLSA {r['dense_over_clsa']:.2f}x")


NOTES = [
    "ours_us / baseline_us (and GB/s, %readBW, speedup, targets) time a CUDA-graph replay of the call: GPU time "
    "without Python launch overhead, as a graph-captured decode step runs. *_eager_us time the plain call, which "
    "at small sizes mostly measures host launch cost. An 'e' suffix: capture failed, eager time used. "
    "On CPU everything is eager (time.perf_counter) and meaningless as performance.",
    "Times are medians of triton.testing.do_bench, which clears L2 (writes 256 MB) before every rep, so even small "
    "inputs (k_idx at B=1, N=8K is 2 MB) are read from HBM; such tiny cases are latency bound and their GB/s "
    "says little.",
    "GB/s = the op's useful bytes / time; the baseline is credited with the same bytes as ours. "
    "%readBW = GB/s / read_bw (the better of the sum/amax reductions).",
    "Sparse indices = exact top-k of fp32 indexer scores (in score order, not sorted by position).",
    "The 16-layer run cycles through 'distinct_caches' different K/V caches (all 16 when they fit 16 GiB) "
    "so later layers are not served from L2; its baseline is 16 x the one-layer gather + SDPA time.",
    "Baseline gathers use precomputed flat row indices; gather + SDPA includes the gathers.",
]


# ----------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------


def parse_size(text: str) -> int:
    text = text.strip().lower()
    return int(text[:-1]) * 1024 if text.endswith("k") else int(text)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("bench/results"), help="directory for kernels.json/.txt")
    p.add_argument("--smoke", action="store_true", help="tiny CPU-friendly sizes, fp32, torch (+ triton) backends")
    p.add_argument("--only", action="append", choices=OPS, help="run only these ops (repeatable)")
    p.add_argument("--ns", nargs="+", type=parse_size, help="context lengths (e.g. 8K 32768)")
    p.add_argument("--bs", nargs="+", type=int, help="batch sizes")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--rep-ms", type=int, default=REP_MS, help="do_bench repetition time per measurement")
    p.add_argument("--budget-s", type=float, default=360.0, help="skip remaining configs after this many seconds")
    p.add_argument("--wide-from", type=Path, help="sparse_wide.json of bench/sweep_kernels.py --wide: use the wide "
                                                   "sparse kernel from the batch where it won")
    return p.parse_args(argv)


def choose_wide(rows: list[dict], pdl_max_batch: int) -> tuple[int, tuple[int, ...]] | None:
    """(WIDE_MIN_BATCH, WIDE_CONFIG) from the wide sweep's rows: the smallest swept batch from which
    some wide configuration is faster alone (`us_1`) than the per-head kernel at that batch and at
    every larger one, and the configuration with the least total time relative to per-head over
    those batches; None when per-head wins at the largest batch. A variant counts at a batch only
    with PDL on exactly where the kernels use it (B <= pdl_max_batch)."""
    per_head = {r["B"]: r["us_1"] for r in rows if not r["variant"].startswith("wide")}
    wide: dict[tuple[int, ...], dict[int, float]] = {}
    for r in rows:
        if r["variant"].startswith("wide"):
            variant = ast.literal_eval(r["variant"].removeprefix("wide "))  # the sweep writes str(list)
            if bool(variant[5]) == (r["B"] <= pdl_max_batch):
                wide.setdefault(tuple(variant[:5]), {})[r["B"]] = r["us_1"]
    batches = sorted(per_head)
    for i, low in enumerate(batches):
        upper = batches[i:]
        scores = {config: sum(times[b] / per_head[b] for b in upper) for config, times in wide.items()
                  if all(b in times and times[b] < per_head[b] for b in upper)}
        if scores:
            return low, min(scores, key=scores.__getitem__)
    return None


def environment(device: torch.device) -> dict[str, str]:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "triton": getattr(triton, "__version__", "not installed"),
        "python": platform.python_version(),
        "device": name,
        "host": platform.node(),
    }


def print_header(report: Report, env: dict[str, str], shape: Shape, ns: list[int], bs: list[int]) -> None:
    report.line(f"CLSA kernel benchmark  {env['date']}")
    report.line(f"torch {env['torch']}  triton {env['triton']}  python {env['python']}  device {env['device']}")
    report.line(f"shape Hq={shape.hq} Hkv={shape.hkv} d={shape.d} d_idx={shape.d_idx} k={shape.k} "
                f"dtype={str(shape.dtype).removeprefix('torch.')} block_size={shape.block_size}  "
                f"N={[fmt_n(n) for n in ns]} B={bs}")


def print_bandwidth(report: Report, bw: dict[str, float] | None) -> None:
    if bw is None:
        report.line("bandwidth: skipped (no CUDA); %readBW is n/a")
        return
    report.line(f"bandwidth ({bw['tensor_bytes'] / 2**30:.0f} GiB bf16): copy {bw['copy_gbps']:.0f} GB/s "
                f"(read+write), sum {bw['sum_gbps']:.0f} GB/s, amax {bw['amax_gbps']:.0f} GB/s "
                f"-> read BW {bw['read_bw_gbps']:.0f} GB/s")
    if bw.get("chain_read_us"):
        report.line(f"  {LAYERS} bare reads of {bw['chain_read_bytes'] / 2**20:.0f} MiB each, back to back in one "
                    f"graph: {bw['chain_read_us']:.1f} us ({bw['chain_read_us'] / LAYERS:.2f} us each)")
    for nbytes, us in bw.get("sized_read_us", {}).items():
        gbps = nbytes / (us * 1e-6) / 1e9
        report.line(f"  a bare read of {nbytes / 2**20:.0f} MiB alone (sum/amax, CUDA graph): {us:.1f} us = "
                    f"{gbps:.0f} GB/s = {100 * gbps / bw['read_bw_gbps']:.1f}% of read BW")


def config_order(ns: list[int], bs: list[int]) -> list[tuple[int, int]]:
    """Target N first, so a budget cut loses the least important configs."""
    return sorted(((n, b) for n in ns for b in bs), key=lambda nb: (nb[0] != TARGET_N, nb[0], nb[1]))


def run_config(ctx: Ctx, n: int, b: int, ops: list[str]) -> list[Row]:
    torch.manual_seed(1000 + n + b)
    case = build_case(ctx.shape, n, b, ctx.device)
    rows: list[Row] = []
    try:
        for op in ops:
            ctx.report.progress(f"N={fmt_n(n)} B={b}: {op}")
            rows += BENCHES[op](ctx, case)
    finally:
        del case
        free_device_memory()
    return rows


def run_grid(ctx: Ctx, ns: list[int], bs: list[int], ops: list[str], budget_s: float) -> tuple[list[Row], list[str]]:
    rows: list[Row] = []
    skipped: list[str] = []
    configs = config_order(ns, bs)
    for i, (n, b) in enumerate(configs):
        if ctx.report.elapsed_s() > budget_s:
            skipped.append(f"N={fmt_n(n)} B={b}")
            continue
        ctx.report.progress(f"config {i + 1}/{len(configs)}: N={fmt_n(n)} B={b}")
        try:
            rows += run_config(ctx, n, b, ops)
        except torch.cuda.OutOfMemoryError as exc:
            ctx.report.alert(f"N={fmt_n(n)} B={b}: out of memory, config skipped ({short_error(exc)})")
            skipped.append(f"N={fmt_n(n)} B={b} (OOM)")
            free_device_memory()
    if skipped:
        ctx.report.alert(f"skipped configs (time budget {budget_s:.0f}s / OOM): {skipped}")
    return rows, skipped


def write_outputs(out_dir: Path, report: Report, payload: dict[str, Any]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "kernels.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    (out_dir / "kernels.txt").write_text("\n".join(report.lines) + "\n")
    print(f"wrote {out_dir / 'kernels.json'} and {out_dir / 'kernels.txt'}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = smoke_shape(args.block_size) if args.smoke else clsa_4b_shape(args.block_size)
    ns = args.ns or list(SMOKE_NS if args.smoke else FULL_NS)
    bs = args.bs or list(SMOKE_BS if args.smoke else FULL_BS)
    ops = [op for op in OPS if not args.only or op in args.only]
    report, env = Report(), environment(device)
    print_header(report, env, shape, ns, bs)
    api = load_api()  # puts the repo's `kernels` package ahead of this script on sys.path
    if args.wide_from:
        da = importlib.import_module("kernels.decode_attention")
        choice = choose_wide(json.loads(args.wide_from.read_text()), da.PDL_MAX_BATCH)
        if choice is not None:
            da.WIDE_MIN_BATCH, da.WIDE_CONFIG = choice
        report.line(f"sparse kernel from {args.wide_from}: " + (
            f"wide {list(choice[1])} (tokens, heads, warps, stages, programs/SM) at B >= {choice[0]}, per-head below"
            if choice else "per-head at every batch (the wide kernel won nowhere)"))
    backends = ["torch", "triton"] if args.smoke or device.type != "cuda" else ["triton"]
    ctx = Ctx(api, Timer(device, args.rep_ms), shape, device, report, backends)
    report_availability(ctx)
    bandwidth = measure_bandwidth(ctx.timer, device) if device.type == "cuda" else None
    ctx.read_bw = bandwidth["read_bw_gbps"] if bandwidth else None
    print_bandwidth(report, bandwidth)
    rows, skipped = run_grid(ctx, ns, bs, ops, args.budget_s)
    print_tables(report, rows, ctx.read_bw)
    target_n, targets = evaluate_targets(rows, ns, bs, ctx.read_bw, bandwidth)
    print_targets(report, target_n, targets)
    ratios = step_ratios(rows, ns, bs)
    print_step_ratios(report, ratios)
    report.line()
    for note in NOTES:
        report.line(f"note: {note}")
    report.line(f"total {report.elapsed_s():.1f} s")
    payload = {
        "env": env, "args": {k: str(v) for k, v in vars(args).items()},
        "shape": {**asdict(shape), "dtype": str(shape.dtype)},
        "availability": ctx.available, "bandwidth": bandwidth, "rows": [r.to_json(ctx.read_bw) for r in rows],
        "targets": {"n": target_n, "items": [asdict(t) for t in targets]}, "step_ratios": ratios,
        "skipped": skipped, "notes": NOTES,
    }
    write_outputs(args.out, report, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
