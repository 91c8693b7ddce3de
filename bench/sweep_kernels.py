"""Launch-configuration sweep of the Triton decode kernels on the GPU (clsa-4b heads, bf16, N=128K).

Times launch-configuration variants as CUDA-graph replays (median of do_bench, L2 cleared between
reps), each checked against its torch reference first; the winners go into kernels/.

    python bench/sweep_kernels.py --out DIR                   sparse and dense configurations (~3 min)
    python bench/sweep_kernels.py --quick --out DIR           index_topk: one cooperative launch vs four,
                                                              shapes, programs per SM, time per phase
    python bench/sweep_kernels.py --quick --variants --out DIR   + sparse attention with and without PDL
    python bench/sweep_kernels.py --flush-check --out DIR     write- vs read-flushed L2; sparse configs
    python bench/sweep_kernels.py --wide --out DIR            the wide sparse kernel's variants vs per-head
    python bench/sweep_kernels.py --tune --out DIR            index_topk prefetch depths and shapes (with
                                                              time per phase); sparse attention: fused or
                                                              separate merge, splits, PDL, wide shapes
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import math
import sys
from pathlib import Path

import torch
import triton.testing

sys.path[:] = [p for p in sys.path if Path(p).resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kernels.decode_attention as da  # noqa: E402

it = importlib.import_module("kernels.index_topk")  # the package's `index_topk` is the function
from kernels import SparseDecodeWrapper, dense_decode_attention, index_topk  # noqa: E402
from kernels.decode_attention import sparse_decode_attention_reference  # noqa: E402

HQ, HKV, D, D_IDX, K, PAGE = 24, 8, 128, 128, 2048, 16


_FLUSH: dict[str, torch.Tensor] = {}


def flushed_us(fn, flush: str, rep_ms: float = 100.0) -> float:  # noqa: ANN001
    """Median CUDA-event time of fn() with L2 cleared before every rep: by writing 256 MB (what
    triton's do_bench does; it leaves ~50 MB of dirty lines to be written back during fn) or by
    reading 256 MB (clean lines, evicted for free)."""
    if "buf" not in _FLUSH:
        _FLUSH["buf"] = torch.empty(64 * 1024 * 1024, dtype=torch.float32, device="cuda")
        _FLUSH["sink"] = torch.empty((), dtype=torch.float32, device="cuda")
    buf, sink = _FLUSH["buf"], _FLUSH["sink"]

    def clear() -> None:
        if flush == "write":
            buf.zero_()
        else:
            torch.amax(buf, dim=0, out=sink)

    fn()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(5):
        clear()
        fn()
    e1.record()
    torch.cuda.synchronize()
    reps = int(max(20, min(1000, rep_ms / max(e0.elapsed_time(e1) / 5, 1e-3))))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        clear()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    times = sorted(a.elapsed_time(b) for a, b in zip(starts, ends, strict=True))
    return 1000 * times[len(times) // 2]


def graph_of(fn):  # noqa: ANN001, ANN201
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def graph_us(fn) -> float:  # noqa: ANN001
    """Median of do_bench (L2 written over before each rep) over a CUDA-graph replay of fn()."""
    graph = graph_of(fn)
    return 1000 * triton.testing.do_bench(graph.replay, warmup=25, rep=100, return_mode="median")


def paged_case(batch: int, n: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    blocks = batch * n // PAGE
    table = torch.randperm(blocks, generator=gen).view(batch, n // PAGE).int().cuda()
    return {
        "table": table,
        "lens": torch.full((batch,), n, dtype=torch.int32, device="cuda"),
        "k": torch.randn(blocks, PAGE, HKV, D, device="cuda", dtype=torch.bfloat16),
        "v": torch.randn(blocks, PAGE, HKV, D, device="cuda", dtype=torch.bfloat16),
        "kidx": torch.randn(blocks, PAGE, D_IDX, device="cuda", dtype=torch.bfloat16),
        "q": torch.randn(batch, HQ, D, device="cuda", dtype=torch.bfloat16),
        "qidx": torch.randn(batch, D_IDX, device="cuda", dtype=torch.bfloat16),
        "idx": torch.stack([torch.randperm(n, generator=gen)[:K] for _ in range(batch)]).int().cuda(),
    }


def sweep_sparse(case: dict, batch: int, results: list) -> None:
    scale = 1 / math.sqrt(D)
    ref = sparse_decode_attention_reference(case["q"], case["k"], case["v"], case["table"], case["lens"],
                                            case["idx"], scale).float()
    da.SMALL_BATCH = 0  # SPARSE_CONFIG at every batch size while sweeping
    for block_n, warps, stages, fused, waves in itertools.product((32, 64), (4,), (1, 2), (True, False),
                                                                  (1, 2, 4, 8, 16)):
        da.SPARSE_CONFIG, da.SPARSE_WAVES = (block_n, warps, stages, fused), waves
        w = SparseDecodeWrapper("triton")
        w.plan(case["table"], case["lens"], case["idx"], PAGE)
        out = w.run(case["q"], case["k"], case["v"], scale)
        err = ((out.float() - ref).norm() / ref.norm()).item()
        us = graph_us(lambda w=w: w.run(case["q"], case["k"], case["v"], scale))
        gbs = batch * K * HKV * D * 2 * 2 / us / 1e3
        results.append({"op": "sparse", "B": batch, "cfg": [block_n, warps, stages, fused, waves], "us": us,
                        "GB/s": gbs, "err": err})


def sweep_dense(case: dict, batch: int, n: int, results: list) -> None:
    scale = 1 / math.sqrt(D)
    q4 = case["q"].view(batch, HKV, HQ // HKV, D)
    kc = case["k"][case["table"].long()].reshape(batch, n, HKV, D).transpose(1, 2)
    vc = case["v"][case["table"].long()].reshape(batch, n, HKV, D).transpose(1, 2)
    ref = torch.nn.functional.scaled_dot_product_attention(q4, kc, vc, scale=scale).reshape(batch, HQ, D).float()
    sdpa_us = graph_us(lambda: torch.nn.functional.scaled_dot_product_attention(q4, kc, vc, scale=scale))
    results.append({"op": "dense-sdpa", "B": batch, "us": sdpa_us})
    for block_n, warps, stages, fused, waves in itertools.product((64, 128), (4, 8), (3, 4), (False, True),
                                                                  (4, 8, 16)):
        da.DENSE_CONFIG, da.DENSE_WAVES = (block_n, warps, stages, fused), waves
        out = dense_decode_attention(case["q"], case["k"], case["v"], case["table"], case["lens"], scale)
        err = ((out.float() - ref).norm() / ref.norm()).item()
        us = graph_us(lambda: dense_decode_attention(case["q"], case["k"], case["v"], case["table"], case["lens"],
                                                     scale))
        results.append({"op": "dense", "B": batch, "cfg": [block_n, warps, stages, fused, waves], "us": us,
                        "vs_sdpa": sdpa_us / us, "err": err})


def time_topk(case: dict, batch: int, n: int, results: list) -> None:
    keys = case["kidx"][case["table"].long()].reshape(batch, n, D_IDX)
    scores = torch.einsum("bd,bnd->bn", case["qidx"].float(), keys.float())
    want = scores.topk(K, dim=1).indices
    got = index_topk(case["qidx"], case["kidx"], case["table"], case["lens"], K)
    overlap = min(len(set(got[b].tolist()) & set(want[b].tolist())) / K for b in range(batch))
    ours = graph_us(lambda: index_topk(case["qidx"], case["kidx"], case["table"], case["lens"], K))
    base = graph_us(lambda: torch.einsum("bd,bnd->bn", case["qidx"], keys).float().topk(K, dim=1))
    results.append({"op": "topk", "B": batch, "N": n, "us": ours, "torch_us": base, "overlap": overlap,
                    "GB/s": batch * n * D_IDX * 2 / ours / 1e3})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--skip-dense", action="store_true")
    parser.add_argument("--quick", action="store_true", help="index_topk variants (and --variants) only")
    parser.add_argument("--variants", action="store_true", help="with --quick: sparse attention variants")
    parser.add_argument("--flush-check", action="store_true", help="write- vs read-flush timings, sparse configs")
    parser.add_argument("--wide", action="store_true", help="the wide sparse kernel against the per-head one")
    parser.add_argument("--tune", action="store_true", help="index_topk and sparse variants (tune_sweep)")
    parser.add_argument("--cases", type=lambda v: [tuple(int(x) for x in c.split(":")) for c in v.split(",")],
                        default=[(131072, 1), (131072, 8), (131072, 32), (8192, 1), (32768, 1)],
                        help="with --tune: N:B cases for index_topk (sparse runs at N = 128K for --batches)")
    parser.add_argument("--no-stages", action="store_true", help="with --tune: skip index_topk's time per phase")
    parser.add_argument("--topk-defaults", action="store_true",
                        help="with --tune: index_topk's default configuration only (for A/B runs of two versions)")
    parser.add_argument("--batches", type=lambda v: [int(x) for x in v.split(",")], default=[1, 8, 32])
    args = parser.parse_args()
    if args.tune:
        tune_sweep(args)
        return
    if args.wide:
        wide_sweep(args)
        return
    if args.flush_check:
        flush_check(args)
        return
    if args.quick:
        quick(args)
        return
    gen = torch.Generator().manual_seed(0)
    results: list[dict] = []
    for n in (8192, 32768, 131072):
        for batch in (1, 8, 32):
            case = paged_case(batch, n, gen)
            time_topk(case, batch, n, results)
            if n == 131072:
                sweep_sparse(case, batch, results)
                if not args.skip_dense:
                    sweep_dense(case, batch, n, results)
            print(f"done N={n} B={batch}", file=sys.stderr, flush=True)
            del case
            torch.cuda.empty_cache()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(results, indent=1))
    for op in ("topk", "sparse", "dense"):
        rows = [r for r in results if r["op"] == op]
        print(f"== {op}")
        for batch in (1, 8, 32):
            mine = sorted((r for r in rows if r["B"] == batch), key=lambda r: r["us"])
            for r in mine[:6] if op != "topk" else mine:
                print("  ", {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()})
    for r in results:
        if r["op"] == "dense-sdpa":
            print("sdpa", r)


TOPK_VARIANTS = [("coop", (64, 4, 1), 4, 1), ("coop", (64, 4, 1), 3, 1), ("coop", (32, 4, 1), 4, 1),
                 ("four", (64, 4, 1), 8, 1), ("four", (64, 4, 1), 16, 1)]


def topk_variants(case: dict, batch: int, n: int, results: list, variants: list | None = None,
                  stages: bool = True) -> None:
    """index_topk in one cooperative launch under several shapes, and in four launches; each
    checked against torch.topk, then timed; the cooperative scoring phase alone for the floor."""
    tt = importlib.import_module("kernels.triton_topk")
    keys = case["kidx"][case["table"].long()].reshape(batch, n, D_IDX)
    want = torch.einsum("bd,bnd->bn", case["qidx"].float(), keys.float()).topk(K, dim=1).indices
    base = graph_us(lambda: torch.einsum("bd,bnd->bn", case["qidx"], keys).float().topk(K, dim=1))
    names = ("COOP_CONFIG", "TOPK_CONFIG", "COOP_CTAS_PER_SM", "COOPERATIVE", "TOPK_WAVES", "SMALL_BATCH")
    saved = {name: getattr(it, name) for name in names}
    it.SMALL_BATCH = 0  # COOP_CONFIG at every batch size while sweeping
    # (mode, (BLOCK_N, warps, stages), programs per SM, blocks of keys in flight)
    for mode, shape, per_sm, ahead in variants or TOPK_VARIANTS:
        if mode == "coop":
            it.COOP_CONFIG, it.COOP_CTAS_PER_SM, it.COOPERATIVE = (*shape, shape[1], ahead), per_sm, True
        else:
            it.TOPK_CONFIG, it.TOPK_WAVES, it.COOPERATIVE = (*shape, 8, ahead), per_sm, False
        it._NO_COOP.clear()  # a variant whose grid was refused must not send the next ones to four launches
        try:
            got = index_topk(case["qidx"], case["kidx"], case["table"], case["lens"], K)
            torch.cuda.synchronize()
            if mode == "coop" and it._NO_COOP:
                print("topk variant: the cooperative grid was refused:", shape, per_sm, flush=True)
                continue
            overlap = min(len(set(got[b].tolist()) & set(want[b].tolist())) / K for b in range(batch))
            us = graph_us(lambda: index_topk(case["qidx"], case["kidx"], case["table"], case["lens"], K))
            eager = 1000 * triton.testing.do_bench(
                lambda: index_topk(case["qidx"], case["kidx"], case["table"], case["lens"], K), return_mode="median")
            chain = graph_us(lambda: [index_topk(case["qidx"], case["kidx"], case["table"], case["lens"], K)
                                      for _ in range(8)]) / 8
            clean = int(tt._WORKSPACE[got.device].count_nonzero())
            phases = topk_stages(case, batch, tt, mode == "coop") if stages else []
        except Exception as e:  # noqa: BLE001 -- an experiment: report and go on
            print("topk variant failed:", mode, shape, per_sm, repr(e)[:300], flush=True)
            continue
        results.append({"op": "topk-var", "B": batch, "N": n, "mode": mode, "shape": shape, "per_sm": per_sm,
                        "ahead": ahead,
                        "us": round(us, 1), "eager_us": round(eager, 1),
                        "per_call_of_8": round(chain, 1), "torch_us": round(base, 1), "x_torch": round(base / us, 2),
                        "overlap": overlap, "workspace_nonzero": clean, "stages_us": phases})
        print(results[-1], flush=True)
    for name, value in saved.items():
        setattr(it, name, value)


def topk_stages(case: dict, batch: int, tt: object, coop: bool) -> list[float]:
    """Graph time of index_topk's phases 1..p run as separate launches (p = 1, 2, 3, 4) with the
    current configuration's grid, minus a graph of only the workspace memset that restores the
    zeros a skipped phase 4 would have restored."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    if coop:
        block_n, warps, stages, fwarps, ahead = it.COOP_CONFIG
        members = it.COOP_CTAS_PER_SM * sms // batch
    else:
        block_n, warps, stages, fwarps, ahead = it.TOPK_CONFIG
        members = it._cdiv(it.TOPK_WAVES * sms, batch)
    out = torch.empty((batch, K), dtype=torch.int32, device="cuda")
    work = tt.workspace(batch, out.device)

    def phases(upto: int) -> None:
        tt.launch_index_topk(case["qidx"], case["kidx"], case["table"], case["lens"], K, out, n_members=members,
                             cooperative=False, block_n=block_n, num_warps=warps, num_stages=stages,
                             finish_warps=fwarps, lanes_per_row=it.LANES_PER_K * K, last_phase=upto,
                             ahead=ahead)
        if upto < 4:
            work.zero_()

    zero = graph_us(lambda: work.zero_())
    times = [round(graph_us(lambda p=p: phases(p)) - (zero if p < 4 else 0.0), 1) for p in (1, 2, 3, 4)]
    work.zero_()
    return times


def sparse_variants(case: dict, batch: int, results: list, n_caches: int) -> None:
    """One sparse layer alone (graph of one call) and per call in a chain of 16 calls that cycle
    through `n_caches` distinct K/V caches (L2-cold rows, as in a model whose GEMMs evict L2),
    with and without programmatic dependent launch, merged by a kernel or by the last split."""
    scale = 1 / math.sqrt(D)
    ref = sparse_decode_attention_reference(case["q"], case["k"], case["v"], case["table"], case["lens"],
                                            case["idx"], scale).float()
    caches = [(case["k"], case["v"])] + [(torch.randn_like(case["k"]), torch.randn_like(case["v"]))
                                         for _ in range(n_caches - 1)]
    qs = torch.randn(16, *case["q"].shape, device="cuda", dtype=torch.bfloat16)
    ta = importlib.import_module("kernels.triton_attention")
    saved = da.SPARSE_CONFIG, da.SPARSE_WAVES, da.PDL
    saved_small, saved_early = da.SMALL_BATCH, ta.EARLY_TRIGGER
    da.SMALL_BATCH = 0  # SPARSE_CONFIG at every batch size while sweeping
    for pdl, fused, early, (block_n, warps, stages, waves) in [
            (True, False, True, (64, 4, 1, 8)), (True, False, True, (64, 4, 1, 4)), (True, True, False, (64, 4, 1, 8)),
            (True, False, True, (128, 8, 1, 2)), (True, False, True, (64, 4, 1, 16)),
            (True, False, False, (64, 4, 1, 8)), (False, False, False, (64, 4, 1, 8))]:
        da.SPARSE_CONFIG, da.SPARSE_WAVES, da.PDL = (block_n, warps, stages, fused), waves, pdl
        ta.EARLY_TRIGGER = early
        w = SparseDecodeWrapper("triton")
        w.plan(case["table"], case["lens"], case["idx"], PAGE)
        try:
            out = w.run(case["q"], case["k"], case["v"], scale)
            err = ((out.float() - ref).norm() / ref.norm()).item()
            one = graph_us(lambda w=w: w.run(case["q"], case["k"], case["v"], scale))
            chain = graph_us(lambda w=w: [w.run(qs[i], *caches[i % n_caches], scale) for i in range(16)])
        except Exception as e:  # noqa: BLE001
            print("sparse variant failed:", pdl, fused, block_n, warps, repr(e)[:400], flush=True)
            continue
        nbytes = batch * K * HKV * D * 2 * 2
        results.append({"op": "sparse-var", "B": batch, "pdl": pdl, "fused": fused, "early": early,
                        "cfg": [block_n, warps, stages, waves], "err": round(err, 5), "us_1": round(one, 1),
                        "us_16": round(chain, 1), "us_per_call": round(chain / 16, 2),
                        "GB/s_1": round(nbytes / one / 1e3), "GB/s_per_call": round(nbytes * 16 / chain / 1e3)})
        print(results[-1], flush=True)
    da.SPARSE_CONFIG, da.SPARSE_WAVES, da.PDL = saved
    da.SMALL_BATCH, ta.EARLY_TRIGGER = saved_small, saved_early


def flush_check(args: argparse.Namespace) -> None:
    """The same graphs timed after a write-flush and after a read-flush of L2, and sparse attention
    launch configurations at B=32 (read flush)."""
    import triton
    import triton.language as tl

    @triton.jit
    def _noop(x_ptr):
        tl.store(x_ptr + tl.program_id(0), 1.0)

    gen = torch.Generator().manual_seed(0)
    results: list[dict] = []
    x = torch.empty(256, device="cuda")
    g = graph_of(lambda: _noop[(1,)](x))
    results.append({"what": "empty kernel", "write": flushed_us(g.replay, "write"),
                    "read": flushed_us(g.replay, "read")})
    print(results[-1], flush=True)
    for batch in (1, 8, 32):
        _flush_batch(batch, gen, results)
        torch.cuda.empty_cache()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "flush_check.json").write_text(json.dumps(results, indent=1))


def _flush_batch(batch: int, gen: torch.Generator, results: list) -> None:
    scale = 1 / math.sqrt(D)
    ta = importlib.import_module("kernels.triton_attention")
    n = 131072
    case = paged_case(batch, n, gen)
    fn = lambda: index_topk(case["qidx"], case["kidx"], case["table"], case["lens"], K)  # noqa: E731
    g = graph_of(fn)
    results.append({"what": f"index_topk B={batch}", "write": flushed_us(g.replay, "write"),
                    "read": flushed_us(g.replay, "read"), "eager_read": flushed_us(fn, "read")})
    print(results[-1], flush=True)
    keys = case["kidx"][case["table"].long()].reshape(batch, n, D_IDX)
    g = graph_of(lambda: torch.einsum("bd,bnd->bn", case["qidx"], keys).float().topk(K, dim=1))
    results.append({"what": f"torch topk B={batch}", "write": flushed_us(g.replay, "write"),
                    "read": flushed_us(g.replay, "read")})
    print(results[-1], flush=True)
    n_caches = {1: 16, 8: 4, 32: 1}[batch]
    caches = [(case["k"], case["v"])] + [(torch.randn_like(case["k"]), torch.randn_like(case["v"]))
                                         for _ in range(n_caches - 1)]
    qs = torch.randn(16, *case["q"].shape, device="cuda", dtype=torch.bfloat16)
    saved = da.SPARSE_CONFIG, da.SPARSE_WAVES, ta.EARLY_TRIGGER
    saved_small = da.SMALL_BATCH
    da.SMALL_BATCH = 0  # SPARSE_CONFIG at every batch size while sweeping
    for (block_n, warps, stages, waves), early in itertools.product(
            ((64, 4, 2, 8), (128, 8, 1, 2), (64, 4, 1, 8), (128, 8, 1, 4)), (True, False)):
        da.SPARSE_CONFIG, da.SPARSE_WAVES, ta.EARLY_TRIGGER = (block_n, warps, stages, False), waves, early
        w = SparseDecodeWrapper("triton")
        w.plan(case["table"], case["lens"], case["idx"], PAGE)
        g1 = graph_of(lambda w=w: w.run(case["q"], case["k"], case["v"], scale))
        g16 = graph_of(lambda w=w: [w.run(qs[i], *caches[i % n_caches], scale) for i in range(16)])
        results.append({"what": f"sparse B={batch} cfg={[block_n, warps, stages, waves]} early={early}",
                        "write": flushed_us(g1.replay, "write"), "read": flushed_us(g1.replay, "read"),
                        "16_write": flushed_us(g16.replay, "write"), "16_read": flushed_us(g16.replay, "read")})
        print({k: (round(v, 1) if isinstance(v, float) else v) for k, v in results[-1].items()}, flush=True)
    da.SPARSE_CONFIG, da.SPARSE_WAVES, ta.EARLY_TRIGGER = saved
    da.SMALL_BATCH = saved_small


WIDE_VARIANTS = [  # (BLOCK_N tokens, KV heads per program, warps, stages, programs per SM, PDL at this batch);
    # registers, spills and shared memory of each: bench/compile_report.py, on the CPU
    (8, 8, 4, 2, 2, False), (8, 8, 4, 3, 2, False), (4, 8, 4, 3, 2, False), (16, 8, 4, 2, 1, False),
    (16, 8, 8, 2, 1, False), (8, 4, 4, 3, 4, False), (16, 4, 4, 2, 4, False), (16, 2, 4, 3, 4, False),
    (32, 2, 4, 2, 4, False), (8, 8, 4, 3, 2, True), (8, 4, 4, 3, 4, True),
]


def wide_sweep(args: argparse.Namespace) -> None:
    """The wide sparse kernel (every KV head of a token in one program) against the per-head one,
    at N = 128K and B = 1, 8, 32: one call alone (write- and read-flushed L2) and per call in a
    chain of 16 over distinct caches, each variant checked against the reference first."""
    gen = torch.Generator().manual_seed(0)
    results: list[dict] = []
    read_bw = _read_bw()
    print(f"read BW (sum over 4 GiB) {read_bw:.0f} GB/s", flush=True)
    for batch in args.batches:
        _wide_batch(batch, gen, read_bw, results)
        torch.cuda.empty_cache()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sparse_wide.json").write_text(json.dumps(results, indent=1))
    print(f"{'B':>3} {'variant':<38} {'err':>8} {'1 call':>8} {'%BW':>6} "
          f"{'1 (rd)':>8} {'%BW':>6} {'chain/call':>10} {'%BW':>6}")
    for r in results:
        print(f"{r['B']:>3} {r['variant']:<38} {r['err']:>8.1e} "
              f"{r['us_1']:>8.1f} {r['pct_bw_1']:>6.1f} {r['us_1_readflush']:>8.1f} {r['pct_bw_1_readflush']:>6.1f} "
              f"{r['us_per_call_of_16']:>10.2f} {r['pct_bw_chain']:>6.1f}")


def _chain_inputs(case: dict, batch: int) -> tuple[torch.Tensor, list, torch.Tensor, int]:
    """For timing one sparse layer alone and 16 in a chain: the reference output of the case's
    layer, the distinct K/V caches the chain cycles through (L2-cold rows, as in a model whose
    GEMMs evict L2; fewer at large B to bound memory), 16 queries, and one layer's bytes."""
    ref = sparse_decode_attention_reference(case["q"], case["k"], case["v"], case["table"], case["lens"],
                                            case["idx"], 1 / math.sqrt(D)).float()
    n_caches = {1: 16, 8: 4}.get(batch, 1)
    caches = [(case["k"], case["v"])] + [(torch.randn_like(case["k"]), torch.randn_like(case["v"]))
                                         for _ in range(n_caches - 1)]
    qs = torch.randn(16, *case["q"].shape, device="cuda", dtype=torch.bfloat16)
    return ref, caches, qs, batch * K * HKV * D * 2 * 2


def _wide_batch(batch: int, gen: torch.Generator, read_bw: float, results: list) -> None:
    scale = 1 / math.sqrt(D)
    case = paged_case(batch, 131072, gen)
    ref, caches, qs, nbytes = _chain_inputs(case, batch)
    n_caches = len(caches)
    saved = da.WIDE_MIN_BATCH, da.WIDE_CONFIG, da.PDL_MAX_BATCH
    for variant in [None, *WIDE_VARIANTS]:
        name = "per-head (default)" if variant is None else "wide " + str(list(variant))
        w = SparseDecodeWrapper("triton")
        w.plan(case["table"], case["lens"], case["idx"], PAGE)
        try:
            if variant is not None:
                da.WIDE_MIN_BATCH, da.WIDE_CONFIG = 0, tuple(variant[:5])
                da.PDL_MAX_BATCH = batch if variant[5] else 0
            out = w.run(case["q"], case["k"], case["v"], scale)
            torch.cuda.synchronize()
            err = ((out.float() - ref).norm() / ref.norm()).item()
            g1 = graph_of(lambda w=w: w.run(case["q"], case["k"], case["v"], scale))
            one = 1000 * triton.testing.do_bench(g1.replay, warmup=25, rep=100, return_mode="median")
            one_read = flushed_us(g1.replay, "read")
            chain = graph_us(lambda w=w: [w.run(qs[i], *caches[i % n_caches], scale) for i in range(16)]) / 16
        except Exception as e:  # noqa: BLE001 -- an experiment: report and go on
            print(f"B={batch} {name} failed: {repr(e)[:300]}", flush=True)
            continue
        finally:
            da.WIDE_MIN_BATCH, da.WIDE_CONFIG, da.PDL_MAX_BATCH = saved
        row = {"op": "sparse-wide", "B": batch, "variant": name, "err": round(err, 5), "us_1": round(one, 1),
               "us_1_readflush": round(one_read, 1),
               "us_per_call_of_16": round(chain, 2), "pct_bw_1": round(100 * nbytes / one / 1e3 / read_bw, 1),
               "pct_bw_1_readflush": round(100 * nbytes / one_read / 1e3 / read_bw, 1),
               "pct_bw_chain": round(100 * nbytes / chain / 1e3 / read_bw, 1)}
        results.append(row)
        print(row, flush=True)


# index_topk: (mode, (BLOCK_N, warps, stages), programs per SM, blocks of keys in flight)
TUNE_TOPK = [("coop", (32, 4, 1), 4, 2), ("coop", (64, 4, 1), 4, 1), ("coop", (128, 8, 1), 2, 1),
             ("coop", (64, 4, 1), 3, 1), ("four", (64, 4, 1), 8, 1)]
# sparse attention: ("head", (BLOCK_N, warps, stages, fused merge), programs per SM, PDL) or
# ("wide", (tokens, heads per program, warps, stages, programs per SM), None, PDL)
TUNE_SPARSE = {
    1: [("head", (128, 8, 1, False), 2, True), ("head", (128, 8, 1, True), 2, True),
        ("head", (128, 8, 1, True), 1, True), ("head", (64, 4, 1, True), 2, True), ("head", (64, 4, 1, True), 3, True),
        ("head", (64, 4, 2, True), 2, True), ("head", (128, 8, 1, True), 2, False),
        ("head", (64, 4, 1, False), 4, True)],
    8: [("head", (64, 4, 2, False), 8, False), ("head", (64, 4, 2, True), 8, False),
        ("head", (64, 4, 2, True), 3, False), ("head", (64, 4, 2, False), 4, False),
        ("head", (64, 4, 2, True), 3, True), ("head", (128, 8, 1, True), 2, False),
        ("wide", (32, 2, 4, 2, 4), None, False), ("wide", (64, 2, 4, 2, 4), None, False),
        ("wide", (32, 2, 4, 3, 4), None, False), ("wide", (64, 1, 4, 2, 4), None, False),
        ("wide", (32, 4, 4, 2, 4), None, False), ("wide", (16, 4, 4, 2, 4), None, False)],
}
TUNE_SPARSE[32] = TUNE_SPARSE[8]


def tune_sweep(args: argparse.Namespace) -> None:
    """index_topk at N = 128K, B = 1, 8, 32 (and 8K, 32K at B=1) over TUNE_TOPK, with the time of
    each phase; sparse attention over TUNE_SPARSE at B = 1, 8, 32: one call alone and per call in
    a chain of 16 over distinct caches. Every variant is checked against its reference first."""
    gen = torch.Generator().manual_seed(0)
    results: list[dict] = []
    read_bw = _read_bw()
    print(f"read BW (sum over 4 GiB) {read_bw:.0f} GB/s", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for n, batch in args.cases:
        case = paged_case(batch, n, gen)
        variants = TUNE_TOPK if n == 131072 else TUNE_TOPK[:3]
        if args.topk_defaults:
            cfg = it.COOP_SMALL_CONFIG if batch <= it.SMALL_BATCH else it.COOP_CONFIG
            variants = [("coop", cfg[:3], it.COOP_CTAS_PER_SM, cfg[4])]
        topk_variants(case, batch, n, results, variants, stages=not args.no_stages)
        if n == 131072 and batch in args.batches:
            _tune_sparse(case, batch, read_bw, results)
        (out / "tune.json").write_text(json.dumps(results, indent=1))
        del case
        torch.cuda.empty_cache()
    print(f"{'op':<10} {'B':>3} {'N':>7} {'variant':<44} {'err/ovl':>8} {'1 call':>8} {'%BW':>6} {'chain/call':>10}"
          f" {'%BW':>6}  phases")
    for r in results:
        if r["op"] == "topk-var":
            name = f"{r['mode']} {list(r['shape'])} x{r['per_sm']}/SM ahead {r['ahead']}"
            print(f"{'topk':<10} {r['B']:>3} {r['N']:>7} {name:<44} {r['overlap']:>8.3f} {r['us']:>8.1f} "
                  f"{100 * r['B'] * r['N'] * D_IDX * 2 / r['us'] / 1e3 / read_bw:>6.1f} {r['per_call_of_8']:>10.1f}"
                  f" {'':>6}  {r['stages_us']}")
        else:
            print(f"{'sparse':<10} {r['B']:>3} {131072:>7} {r['variant']:<44} {r['err']:>8.1e} {r['us_1']:>8.1f} "
                  f"{r['pct_bw_1']:>6.1f} {r['us_per_call_of_16']:>10.2f} {r['pct_bw_chain']:>6.1f}")


def _tune_sparse(case: dict, batch: int, read_bw: float, results: list) -> None:
    scale = 1 / math.sqrt(D)
    ref, caches, qs, nbytes = _chain_inputs(case, batch)
    n_caches = len(caches)
    names = ("SMALL_BATCH", "SPARSE_CONFIG", "SPARSE_WAVES", "WIDE_MIN_BATCH", "WIDE_CONFIG", "PDL_MAX_BATCH")
    saved = {name: getattr(da, name) for name in names}
    for kind, cfg, per_sm, pdl in TUNE_SPARSE[batch]:
        da.SMALL_BATCH, da.PDL_MAX_BATCH = 0, (1 << 30) if pdl else 0
        if kind == "head":
            da.SPARSE_CONFIG, da.SPARSE_WAVES, da.WIDE_MIN_BATCH = cfg, per_sm, 1 << 30
            name = f"head {list(cfg[:3])} {'fused' if cfg[3] else 'merge kernel'} x{per_sm}/SM{' PDL' if pdl else ''}"
        else:
            da.WIDE_CONFIG, da.WIDE_MIN_BATCH = cfg, 0
            name = f"wide {list(cfg)}{' PDL' if pdl else ''}"
        try:
            w = SparseDecodeWrapper("triton")
            w.plan(case["table"], case["lens"], case["idx"], PAGE)
            out = w.run(case["q"], case["k"], case["v"], scale)
            torch.cuda.synchronize()
            err = ((out.float() - ref).norm() / ref.norm()).item()
            one = graph_us(lambda w=w: w.run(case["q"], case["k"], case["v"], scale))
            chain = graph_us(lambda w=w: [w.run(qs[i], *caches[i % n_caches], scale) for i in range(16)]) / 16
        except Exception as e:  # noqa: BLE001 -- an experiment: report and go on
            print(f"B={batch} {name} failed: {repr(e)[:300]}", flush=True)
            continue
        finally:
            for key, value in saved.items():
                setattr(da, key, value)
        results.append({"op": "sparse-tune", "B": batch, "variant": name, "kind": kind, "cfg": list(cfg),
                        "per_sm": per_sm, "pdl": pdl, "err": round(err, 5), "us_1": round(one, 1),
                        "us_per_call_of_16": round(chain, 2), "pct_bw_1": round(100 * nbytes / one / 1e3 / read_bw, 1),
                        "pct_bw_chain": round(100 * nbytes / chain / 1e3 / read_bw, 1)})
        print(results[-1], flush=True)


def _read_bw() -> float:
    """GB/s of torch.sum over 4 GiB of bf16 (as bench/kernels.py measures it)."""
    x = torch.randn(2 * 1024**3, device="cuda", dtype=torch.bfloat16)
    us = 1000 * triton.testing.do_bench(x.sum, warmup=25, rep=100, return_mode="median")
    return 4 * 1024**3 / us / 1e3


def quick(args: argparse.Namespace) -> None:
    gen = torch.Generator().manual_seed(0)
    results: list[dict] = []
    for n, batch in ((131072, 1), (131072, 8), (131072, 32), (8192, 1), (32768, 1)):
        case = paged_case(batch, n, gen)
        topk_variants(case, batch, n, results)
        if args.variants and n == 131072 and batch in (1, 8):
            sparse_variants(case, batch, results, n_caches=16 if batch == 1 else 4)
        del case
        torch.cuda.empty_cache()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quick.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
