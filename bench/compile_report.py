"""What ptxas makes of every Triton launch configuration, without a GPU (clsa-4b heads, bf16).

Compiles each kernel as the launchers would launch it on an H200 (sm_90, 132 SMs) at B = 1, 8
and 32 - the default configurations, the wide sparse kernel's sweep variants, and the skinny GEMM
for each clsa-4b projection (with and without its L2 prefetch or 2-3 weight tiles loaded before
its PDL wait, and the self layer's q/k/v with
RoPE and ring writes fused) at B <= 16, and the prefill's SwiGLU gate pass - and prints the
registers per thread, the bytes spilled to local memory per thread, the shared memory, and how many
programs fit on an SM. Spills and occupancy decide a memory-bound kernel's speed before any
timing; this is the check to run on the CPU before spending device time.

    python bench/compile_report.py [--json FILE] [--check]

--check exits 1 when a default configuration spills registers (the test suite runs it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import runpy
import sys
from collections.abc import Callable
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("compile_report: unset TRITON_INTERPRET (it compiles for the GPU, it does not interpret)")

import torch  # noqa: E402

sys.path[:] = [p for p in sys.path if Path(p).resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import importlib  # noqa: E402

import kernels.decode_attention as da  # noqa: E402
import kernels.silu_mul as sm  # noqa: E402
import kernels.skinny_linear as sl  # noqa: E402

it = importlib.import_module("kernels.index_topk")  # the package's `index_topk` is the function
import kernels.triton_attention as ta  # noqa: E402
import kernels.triton_gemm as tg  # noqa: E402
import kernels.triton_pointwise as tp  # noqa: E402
import services.engine.graph_step as gs  # noqa: E402
from kernels.compile_only import Compiled, compiled_for  # noqa: E402

HQ, HKV, D, D_IDX, K, PAGE, N = 24, 8, 128, 128, 2048, 16, 131072
SMS = 132  # the H200's
BATCHES = (1, 8, 32)
CACHE_BLOCKS = 64  # the compiled code does not depend on the cache's size, only on its strides


def _case(batch: int) -> dict[str, torch.Tensor]:
    bf16 = torch.bfloat16
    return {
        "q": torch.zeros(batch, HQ, D, dtype=bf16),
        "k": torch.zeros(CACHE_BLOCKS, PAGE, HKV, D, dtype=bf16),
        "v": torch.zeros(CACHE_BLOCKS, PAGE, HKV, D, dtype=bf16),
        "kidx": torch.zeros(CACHE_BLOCKS, PAGE, D_IDX, dtype=bf16),
        "qidx": torch.zeros(batch, D_IDX, dtype=bf16),
        "table": torch.zeros(batch, N // PAGE, dtype=torch.int32),
        "lens": torch.full((batch,), N, dtype=torch.int32),
        "idx": torch.zeros(batch, K, dtype=torch.int32),
        "out": torch.zeros(batch, HQ, D, dtype=bf16),
    }


WO = torch.zeros(HQ * D, 3072, dtype=torch.bfloat16)  # a layer's output projection weight (l2_next)


def sparse(case: dict, batch: int, wide: tuple | None = None, l2_next: bool = False) -> None:
    """The sparse kernels as `SparseDecodeWrapper.run` launches them at this batch on the H200; with
    `wide`, as it would with WIDE_CONFIG = wide."""
    saved = da.WIDE_MIN_BATCH, da.WIDE_CONFIG
    if wide is not None:
        da.WIDE_MIN_BATCH, da.WIDE_CONFIG = 0, wide
    elif batch >= da.WIDE_MIN_BATCH:
        da.WIDE_MIN_BATCH = 1 << 30  # the per-head kernel's row, even where the wide one is the default
    try:
        da.launch_sparse(case["q"], case["k"], case["v"], case["idx"], case["table"], case["lens"], 1 / math.sqrt(D),
                         case["out"], sms=SMS, pdl=_pdl(batch), l2_next=WO if l2_next else None)
    finally:
        da.WIDE_MIN_BATCH, da.WIDE_CONFIG = saved


# The per-head sparse kernel's load-order experiments (kernels/triton_attention.py switches, off by
# default, KV_TOGETHER included), compiled as the small-batch configuration launches them.
SPARSE_SWITCHES = (("K/V together", "KV_TOGETHER", True),
                   ("rows ahead", "SPARSE_ROWS_AHEAD", True), ("K/V ahead", "SPARSE_KV_AHEAD", True),
                   ("prefetch 1", "SPARSE_PREFETCH_BLOCKS", 1),
                   ("prefetch 3", "SPARSE_PREFETCH_BLOCKS", 3),
                   ("next weight to L2, evict_last", "L2_NEXT_EVICT_LAST", True))


def sparse_switched(case: dict, batch: int, name: str, value: object) -> None:
    """`sparse` with kernels.triton_attention's switch `name` set to `value` (restored after)."""
    saved = getattr(ta, name)
    setattr(ta, name, value)
    try:
        sparse(case, batch, l2_next=name.startswith("L2_NEXT"))
    finally:
        setattr(ta, name, saved)


def gather(case: dict, batch: int) -> None:
    """The selected rows' copy of a gathering plan (decode_attention.GATHER_SELECTED)."""
    kv = torch.zeros((2, batch, K, HKV, D), dtype=torch.bfloat16)
    ta.launch_gather_rows(case["k"], case["v"], case["idx"], kv, torch.zeros((batch, K), dtype=torch.int32))


def dense(case: dict, batch: int) -> None:
    da.launch_dense(case["q"], case["k"], case["v"], case["table"], case["lens"], 1 / math.sqrt(D), case["out"],
                    sms=SMS, pdl=_pdl(batch))


def ring(batch: int, fresh: bool, l2_next: bool = False) -> None:
    """A self layer's ring attention (512 rows a slot, DENSE_SMALL_CONFIG at B <= 7): the whole ring
    read after the PDL wait, or all of it before but the token's own row (`fresh`), as the step does."""
    k = torch.zeros(batch + 1, 512, HKV, D, dtype=torch.bfloat16)
    slots = torch.arange(batch, dtype=torch.int32)
    q = torch.zeros(batch, HQ, D, dtype=torch.bfloat16)
    da.launch_dense(q, k, k.clone(), slots[:, None], torch.full((batch,), 512, dtype=torch.int32), 1 / math.sqrt(D),
                    torch.empty_like(q), sms=SMS, pdl=_pdl(batch), kv_before_wait=fresh,
                    fresh=slots.long() if fresh else None, l2_next=WO if l2_next else None)


def _pdl(batch: int) -> bool:
    return da.PDL and batch <= da.PDL_MAX_BATCH  # on sm_90, as `decode_attention._pdl` decides on the card


def topk(case: dict, batch: int, cooperative: bool) -> None:
    """index_topk as one cooperative launch (what it does when the grid fits: B <= 4 x 132) or as
    four (the fallback)."""
    out = torch.zeros(batch, K, dtype=torch.int32)
    it._launch(case["qidx"], case["kidx"], case["table"], case["lens"], K, out, cooperative, SMS)


SKINNY_FUSIONS = {(5120, 3072): "norm", (3072, 3072): "residual", (16384, 3072): "norm", (3072, 8192): "silu",
                  (32000, 3072): "norm"}  # clsa-4b's decode projections (N, K) and the fusion each gets


def skinny(batch: int, n: int, k: int, prefetch: bool, pre_wait: int = 1, order: str = "in_turn",
           post_prefetch: int = 0) -> None:
    """The skinny GEMM for a [N, K] weight at M = batch, as `skinny_linear` plans it (`pre_wait`
    weight tiles loaded before the PDL wait; `order` and `post_prefetch`: `skinny_linear`'s
    POST_WAIT_ORDER and POST_WAIT_PREFETCH)."""
    fusion = SKINNY_FUSIONS[(n, k)]
    block_n, block_k, split_k, warps, stages = sl.launch_plan(n, k)
    x = torch.zeros(batch, 2 * k if fusion == "silu" else k, dtype=torch.bfloat16)
    out = torch.zeros(batch, n, dtype=torch.bfloat16)
    columns = -(-n // block_n)
    tg.launch_skinny_gemm(x, torch.zeros(n, k, dtype=torch.bfloat16), out,
                          out.clone() if fusion in ("residual", "silu") else None,
                          torch.ones(k, dtype=torch.bfloat16) if fusion == "norm" else None, 1e-6,
                          torch.zeros(split_k * 16 * n), torch.zeros(columns * split_k * 16),
                          torch.zeros(columns, dtype=torch.int32), silu=fusion == "silu", block_n=block_n,
                          block_k=block_k, split_k=split_k, num_warps=warps, num_stages=stages, pdl=True,
                          prefetch=prefetch, pre_wait_tiles=pre_wait,
                          post_wait_order=sl.POST_WAIT_ORDERS[order], post_wait_prefetch=post_prefetch)


def skinny_qkv(batch: int) -> None:
    """The self layer's fused q/k/v + RoPE + ring writes (`skinny_qkv`) at M = batch."""
    n, k = (HQ + 2 * HKV) * D, 3072
    _, block_k, split_k, warps, stages = sl.launch_plan(n, k, D)
    columns = n // D
    ring = torch.zeros(batch + 1, 512, HKV, D, dtype=torch.bfloat16)
    idx = torch.zeros(batch, dtype=torch.int64)
    tg.launch_skinny_gemm(torch.zeros(batch, k, dtype=torch.bfloat16), torch.zeros(n, k, dtype=torch.bfloat16),
                          torch.zeros(batch, n, dtype=torch.bfloat16), None, torch.ones(k, dtype=torch.bfloat16), 1e-6,
                          torch.zeros(split_k * 16 * n), torch.zeros(columns * split_k * 16),
                          torch.zeros(columns, dtype=torch.int32), silu=False, block_n=D, block_k=block_k,
                          split_k=split_k, num_warps=warps, num_stages=stages, pdl=True,
                          rope=(torch.zeros(batch, D // 2), torch.zeros(batch, D // 2), (HQ + HKV) * D),
                          ring=(ring, ring.clone(), idx, idx, HQ * D, (HQ + HKV) * D))


def silu_mul(rows: int) -> None:
    """The prefill's SwiGLU gate over `rows` tokens of clsa-4b's FFN (F = 8192)."""
    block_m, block_f, warps = sm.SILU_MUL_CONFIG
    tp.launch_silu_mul(torch.zeros(rows, 2 * 8192, dtype=torch.bfloat16), torch.zeros(rows, 8192, dtype=torch.bfloat16),
                       block_m=block_m, block_f=block_f, num_warps=warps)


def collect() -> list[dict]:
    rows: list[dict] = []

    def record(op: str, batch: int, variant: str, default: bool, launch: Callable[..., None], *args: object) -> None:
        with compiled_for(90) as compiled:
            launch(*args)
        rows.extend(_row(op, batch, variant, default, c) for c in compiled)

    for batch in BATCHES:
        case = _case(batch)
        record("rows", batch, "default", True, ta.launch_positions_to_rows, case["idx"], case["table"], case["lens"],
               case["idx"], PAGE)
        coop = it.COOPERATIVE and batch <= it.COOP_CTAS_PER_SM * SMS
        record("index_topk", batch, "one launch", coop, topk, case, batch, True)
        record("index_topk", batch, "four launches", not coop, topk, case, batch, False)
        wide_default = batch >= da.WIDE_MIN_BATCH
        record("sparse", batch, "per-head", not wide_default, sparse, case, batch)
        if batch <= da.SMALL_BATCH:
            for label, name, value in SPARSE_SWITCHES:
                record("sparse", batch, "per-head " + label, False, sparse_switched, case, batch, name, value)
            record("gather", batch, "selected rows", da.GATHER_SELECTED, gather, case, batch)
        if wide_default:
            record("sparse", batch, "wide " + str(list(da.WIDE_CONFIG)), True, sparse, case, batch, da.WIDE_CONFIG)
        for variant in WIDE_VARIANTS:
            if not (wide_default and tuple(variant) == tuple(da.WIDE_CONFIG)):
                record("sparse", batch, "wide " + str(list(variant)), False, sparse, case, batch, variant)
        record("dense", batch, "default", True, dense, case, batch)
        for fresh in (True, False):
            record("dense", batch, "ring, " + ("fresh row after the wait" if fresh else "all after the wait"),
                   fresh == gs.RING_FRESH_ROW and not gs.L2_NEXT_WEIGHT, ring, batch, fresh)
        record("dense", batch, "ring, fresh row, next weight to L2", gs.RING_FRESH_ROW and gs.L2_NEXT_WEIGHT, ring,
               batch, True, True)
        record("sparse", batch, "per-head, next weight to L2", gs.L2_NEXT_WEIGHT and not wide_default, sparse, case,
               batch, None, True)
        if batch <= 16:  # the model's skinny-GEMM rows (layers.SKINNY_ROWS)
            for n, k in SKINNY_FUSIONS:
                for prefetch in (False, True):
                    record("skinny", batch, f"{n}x{k}" + (" L2 prefetch" if prefetch else ""),
                           prefetch == sl.PREFETCH_L2 and sl.PRE_WAIT_TILES == 1 and sl.POST_WAIT_ORDER == "in_turn"
                           and not sl.POST_WAIT_PREFETCH, skinny, batch, n, k, prefetch)
                for pre_wait in (2, 3):
                    record("skinny", batch, f"{n}x{k} {pre_wait} tiles pre-wait",
                           not sl.PREFETCH_L2 and sl.PRE_WAIT_TILES == pre_wait and sl.POST_WAIT_ORDER == "in_turn"
                           and not sl.POST_WAIT_PREFETCH, skinny, batch, n, k, False, pre_wait)
                for post in (0, 1, 2):  # x's early tiles loaded together after the wait, L2 asked for the next
                    record("skinny", batch, f"{n}x{k} 3 tiles pre-wait, x together"
                           + (f", {post} prefetched after" if post else ""),
                           not sl.PREFETCH_L2 and sl.PRE_WAIT_TILES == 3 and sl.POST_WAIT_ORDER == "x_together"
                           and sl.POST_WAIT_PREFETCH == post, skinny, batch, n, k, False, 3, "x_together", post)
            record("skinny_qkv", batch, "rope + rings", gs.FUSED_QKV_RING, skinny_qkv, batch)
    record("silu_mul", 1024, "prefill chunk", True, silu_mul, 1024)
    return rows


def _swept_wide_shapes() -> list[tuple[int, ...]]:
    """(BLOCK_N tokens, KV heads per program, warps, stages, programs per SM) of every wide-kernel
    variant that bench/sweep_kernels.py times (--wide and --tune), read from that script."""
    sweep = runpy.run_path(str(Path(__file__).with_name("sweep_kernels.py")))
    shapes = [tuple(v[:5]) for v in sweep["WIDE_VARIANTS"]]
    shapes += [tuple(cfg) for variants in sweep["TUNE_SPARSE"].values() for kind, cfg, _, _ in variants
               if kind == "wide"]
    return list(dict.fromkeys(shapes))


WIDE_VARIANTS = _swept_wide_shapes()


def _row(op: str, batch: int, variant: str, default: bool, c: Compiled) -> dict:
    return {"op": op, "B": batch, "variant": variant, "default": default, "kernel": c.kernel,
            "warps": c.options["num_warps"], "stages": c.options["num_stages"], "maxnreg": c.options.get("maxnreg"),
            "grid": list(c.grid), "registers": c.registers, "spill_bytes": c.stack_bytes,
            "shared_bytes": c.shared_bytes, "async_copies": c.async_copies, "programs_per_sm": c.programs_per_sm()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    parser.add_argument("--check", action="store_true", help="exit 1 when a default configuration spills")
    args = parser.parse_args()
    rows = collect()
    print(f"{'op':<11} {'B':>3} {'variant':<22} {'kernel':<30} {'warps':>5} {'st':>3} {'regs':>5} "
          f"{'spill B':>8} {'smem KB':>8} {'cp.async':>8} {'prog/SM':>7} {'grid':>12}")
    for r in rows:
        mark = "*" if r["default"] else " "
        print(f"{r['op']:<11} {r['B']:>3} {r['variant']:<22} {r['kernel'][:30]:<30} {r['warps']:>5} "
              f"{r['stages']:>3} {r['registers']:>5} {r['spill_bytes']:>8} {r['shared_bytes'] / 1024:>8.1f} "
              f"{r['async_copies']:>8} {r['programs_per_sm']:>7} {'x'.join(map(str, r['grid'])):>12}{mark}")
    print("* = the configuration the kernels launch at this batch (sm_90, 132 SMs)")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    spilling = [r for r in rows if r["default"] and r["spill_bytes"] > 0]
    if args.check and spilling:
        for r in spilling:
            print(f"SPILLS: {r['op']} B={r['B']} {r['variant']} {r['kernel']}: {r['spill_bytes']} bytes per thread")
        sys.exit(1)


if __name__ == "__main__":
    main()
