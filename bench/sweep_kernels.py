"""Launch-configuration sweep of the Triton decode kernels on the GPU (clsa-4b heads, bf16, N=128K).

Times every (BLOCK_N, num_warps, num_stages, fused merge, waves) variant of sparse and dense decode
attention as a CUDA-graph replay (median of do_bench, L2 cleared between reps), checks each against
the torch reference once, and times index_topk with its two kernels separately. Prints one table per
op with the best variant per batch size marked; the winners go into kernels/decode_attention.py.

    python bench/sweep_kernels.py --out DIR        (GPU only; about 3 minutes)
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

sys.path[:] = [p for p in sys.path if Path(p).resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kernels.decode_attention as da  # noqa: E402

it = importlib.import_module("kernels.index_topk")  # the package's `index_topk` is the function
from kernels import SparseDecodeWrapper, dense_decode_attention, index_topk  # noqa: E402
from kernels.decode_attention import sparse_decode_attention_reference  # noqa: E402

HQ, HKV, D, D_IDX, K, PAGE = 24, 8, 128, 128, 2048, 16


def graph_us(fn) -> float:  # noqa: ANN001
    import triton.testing

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
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


def topk_stages(case: dict, batch: int, n: int, upto: int) -> float:
    """index_topk's launches up to and including `upto` (0 memset, 1 score, 2 hist, 3 select, 4 finish)."""
    tt = importlib.import_module("kernels.triton_topk")
    block_n, warps, fblock, fwarps = it.TOPK_CONFIG
    chunk = it._cdiv(it._cdiv(n, it._cdiv(it.TOPK_WAVES * 132, batch)), block_n) * block_n
    n_chunks = it._cdiv(n, chunk)
    group = min(block_n, 1 << max(0, (n_chunks * block_n // K).bit_length() - 1))
    sweep_block = min(fblock, 1 << (chunk - 1).bit_length())
    scores = torch.empty((batch, n), dtype=torch.float32, device="cuda")
    cand = torch.empty((batch, n), dtype=torch.int32, device="cuda")
    out = torch.empty((batch, K), dtype=torch.int32, device="cuda")
    lens, table = case["lens"], case["table"]

    def run() -> None:
        counters = torch.zeros((batch, tt.HIST_BINS + tt.META), dtype=torch.int32, device="cuda")
        hist, meta = counters[:, : tt.HIST_BINS], counters[:, tt.HIST_BINS :]
        grid, cs = (batch, it._cdiv(n, chunk)), counters.stride(0)
        if upto >= 1:
            tt._score_kernel[grid](case["qidx"], case["kidx"], table, lens, scores, meta, K, chunk,
                                   case["qidx"].stride(0), case["kidx"].stride(1), table.stride(0),
                                   scores.stride(0), cs, D=D_IDX, PAGE=PAGE, BLOCK_N=block_n, BLOCK_D=D_IDX,
                                   GROUP=group, num_warps=warps)
        if upto >= 2:
            tt._hist_kernel[grid](scores, hist, meta, lens, K, chunk, scores.stride(0), cs, cs,
                                  BLOCK_N=sweep_block, num_warps=warps)
        if upto >= 3:
            tt._select_kernel[grid](scores, hist, meta, cand, out, lens, K, chunk, scores.stride(0), cs, cs,
                                    cand.stride(0), out.stride(0), BLOCK_N=sweep_block, SCAN=tt.SCAN_BLOCK,
                                    num_warps=warps)
        if upto >= 4:
            tt._finish_kernel[(batch,)](scores, meta, cand, out, lens, K, scores.stride(0), cs, cand.stride(0),
                                        out.stride(0), BLOCK_N=fblock, BINS=tt.LOW_BINS, num_warps=fwarps)

    return graph_us(run)


def overheads(case: dict, results: list) -> None:
    """What a graph of 16 sparse layers costs beyond its bytes: same cache (L2-warm rows) vs one
    layer, and 16 empty Triton launches."""
    import triton
    import triton.language as tl

    @triton.jit
    def _noop(x_ptr):
        tl.store(x_ptr + tl.program_id(0), 1.0)

    scale = 1 / math.sqrt(D)
    w = SparseDecodeWrapper("triton")
    w.plan(case["table"], case["lens"], case["idx"], PAGE)
    qs = torch.randn(16, *case["q"].shape, device="cuda", dtype=torch.bfloat16)
    one = graph_us(lambda: w.run(qs[0], case["k"], case["v"], scale))
    sixteen = graph_us(lambda: [w.run(qs[i], case["k"], case["v"], scale) for i in range(16)])
    x = torch.empty(256, device="cuda")
    noop16 = graph_us(lambda: [_noop[(256,)](x) for _ in range(16)])
    noop1 = graph_us(lambda: _noop[(256,)](x))
    results.append({"op": "overhead", "B": case["q"].shape[0], "sparse_1": one, "sparse_16_same_cache": sixteen,
                    "noop_1": noop1, "noop_16": noop16})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--skip-dense", action="store_true")
    parser.add_argument("--quick", action="store_true", help="index_topk by stage (and --variants) only")
    parser.add_argument("--variants", action="store_true", help="with --quick: scoring and sparse variants")
    parser.add_argument("--configs", action="store_true", help="with --quick: index_topk launch configurations")
    args = parser.parse_args()
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


def k1_variants(case: dict, batch: int, n: int, results: list) -> None:
    """The scoring kernel's cost without its histogram atomics, with tl.atomic_add (atom, returns the
    old value) and with a fire-and-forget `red` through inline PTX, at a few block shapes."""
    import triton
    import triton.language as tl

    # ruff: noqa: B023 -- graph_us calls each lambda at once, inside its loop iteration

    @triton.jit
    def _score(q_ptr, kidx_ptr, bt_ptr, scores_ptr, hist_ptr, chunk_size, n_pos, stride_btb, stride_sb, stride_hb,
               D: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr, ATOMIC: tl.constexpr):
        b = tl.program_id(0)
        start = tl.program_id(1) * chunk_size
        offs_d = tl.arange(0, D)
        q = tl.load(q_ptr + b * D + offs_d).to(tl.float32)
        for n0 in range(start, tl.minimum(start + chunk_size, n_pos), BLOCK_N):
            pos = n0 + tl.arange(0, BLOCK_N)
            blocks = tl.load(bt_ptr + b * stride_btb + pos // PAGE)
            rows = (blocks * PAGE + pos % PAGE).to(tl.int64)
            keys = tl.load(kidx_ptr + rows[:, None] * D + offs_d[None, :])
            scores = tl.sum(keys.to(tl.float32) * q[None, :], axis=1)
            tl.store(scores_ptr + b * stride_sb + pos, scores)
            bits = scores.to(tl.int32, bitcast=True)
            digit = ((bits ^ ((bits >> 31) & 0x7FFFFFFF)) >> 16) + 32768
            if ATOMIC == 1:
                tl.atomic_add(hist_ptr + b * stride_hb + digit, 1, sem="relaxed")
            if ATOMIC == 2:
                tl.inline_asm_elementwise(
                    "red.global.relaxed.gpu.add.u32 [$1], 1; mov.u32 $0, 0;", "=r,l",
                    [hist_ptr + b * stride_hb + digit], dtype=tl.int32, is_pure=False, pack=1)

    scores = torch.empty((batch, n), dtype=torch.float32, device="cuda")
    hist = torch.zeros((batch, 65536), dtype=torch.int32, device="cuda")
    for block_n, warps, waves, stages in ((128, 4, 4, 3), (128, 4, 2, 3), (256, 8, 2, 3), (64, 2, 8, 3),
                                          (128, 4, 4, 1)):
        chunk = it._cdiv(it._cdiv(n, it._cdiv(waves * 132, batch)), block_n) * block_n
        grid = (batch, it._cdiv(n, chunk))
        for atomic in (0, 1, 2):
            hist.zero_()
            try:
                us = graph_us(lambda: _score[grid](
                    case["qidx"], case["kidx"], case["table"], scores, hist, chunk, n, case["table"].stride(0),
                    scores.stride(0), hist.stride(0), D=D_IDX, PAGE=PAGE, BLOCK_N=block_n, ATOMIC=atomic,
                    num_warps=warps, num_stages=stages))
            except Exception as e:  # noqa: BLE001 -- an experiment: report and go on
                print("k1 variant failed:", block_n, warps, atomic, repr(e)[:300], flush=True)
                continue
            results.append({"op": "k1", "B": batch, "N": n, "cfg": [block_n, warps, waves, stages],
                            "atomic": atomic, "us": round(us, 1),
                            "GB/s": round(batch * n * D_IDX * 2 / us / 1e3)})
            print(results[-1], flush=True)


def sparse_variants(case: dict, batch: int, results: list) -> None:
    scale = 1 / math.sqrt(D)
    saved = da.SPARSE_CONFIG, da.SPARSE_WAVES
    for block_n, warps, stages, waves in ((64, 4, 2, 8), (128, 4, 2, 8), (128, 8, 2, 8), (64, 8, 2, 8),
                                          (32, 2, 2, 16), (64, 4, 3, 4), (128, 8, 3, 4)):
        da.SPARSE_CONFIG, da.SPARSE_WAVES = (block_n, warps, stages, False), waves
        w = SparseDecodeWrapper("triton")
        w.plan(case["table"], case["lens"], case["idx"], PAGE)
        try:
            one = graph_us(lambda: w.run(case["q"], case["k"], case["v"], scale))
            ten = graph_us(lambda: [w.run(case["q"], case["k"], case["v"], scale) for _ in range(10)])
        except Exception as e:  # noqa: BLE001
            print("sparse variant failed:", block_n, warps, repr(e)[:300], flush=True)
            continue
        results.append({"op": "sparse-var", "B": batch, "cfg": [block_n, warps, stages, waves], "us_1": round(one, 1),
                        "us_per_call_of_10": round(ten / 10, 1)})
        print(results[-1], flush=True)
    da.SPARSE_CONFIG, da.SPARSE_WAVES = saved


def topk_configs(case: dict, batch: int, n: int, results: list) -> None:
    """index_topk (whole, and its scoring kernel alone) under other scoring-block shapes and waves."""
    saved = it.TOPK_CONFIG, it.TOPK_WAVES
    for block_n, warps, waves in ((128, 4, 4), (64, 4, 4), (64, 4, 8), (64, 8, 4), (32, 4, 8), (128, 8, 4)):
        it.TOPK_CONFIG, it.TOPK_WAVES = (block_n, warps, saved[0][2], saved[0][3]), waves
        whole = graph_us(lambda: index_topk(case["qidx"], case["kidx"], case["table"], case["lens"], K))
        score = topk_stages(case, batch, n, 1)
        results.append({"op": "topk-config", "B": batch, "N": n, "cfg": [block_n, warps, waves],
                        "us": round(whole, 1), "score_us": round(score, 1)})
        print(results[-1], flush=True)
    it.TOPK_CONFIG, it.TOPK_WAVES = saved


def quick(args: argparse.Namespace) -> None:
    gen = torch.Generator().manual_seed(0)
    results: list[dict] = []
    for n, batch in ((8192, 1), (131072, 1), (131072, 8), (131072, 32)):
        case = paged_case(batch, n, gen)
        time_topk(case, batch, n, results)
        results[-1]["stages_us"] = [round(topk_stages(case, batch, n, i), 1) for i in range(5)]
        if args.configs:
            topk_configs(case, batch, n, results)
        if args.variants:
            k1_variants(case, batch, n, results)
            if batch in (1, 8):
                sparse_variants(case, batch, results)
                overheads(case, results)  # the launch floor docs/kernels.md quotes
        print([r for r in results if r["op"] == "topk"][-1], flush=True)
        del case
        torch.cuda.empty_cache()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quick.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
