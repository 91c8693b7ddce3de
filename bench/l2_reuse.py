"""Do the 16 cross layers of a step read their rows from L2? All of them read the same selected
rows of the one shared K/V cache (8 MiB a sequence at clsa-4b shapes); between two cross layers
the model streams that layer's weights (189 MB at clsa-4b: Wq, Wo, the SwiGLU FFN) through the
50 MB L2. This times, at N = 128K, k = 2048, as CUDA graphs of 16 layers (median of do_bench, L2
written over before every rep):

- attention alone, 16 distinct caches (every layer's rows from HBM: bench/kernels.py's chain);
- attention alone on the one shared cache, back to back (CLSA's literal 16 layers);
- the step's cross-layer chain: each layer's attention output through a GEMM over that layer's
  189 MB of weights, whose output is the next layer's query (a true dependency chain), and the
  same GEMMs alone; their difference is what attention adds to the step;

each with the rows loaded at normal L2 priority and with evict_last (`L2_RESIDENT_FRACTION`).

The flush before each rep must also clear lines loaded with evict_last, which a normal write of
256 MB (do_bench's) may not evict: this one first reads 256 MB with evict_last (so it replaces
every evict_last line), then lowers those lines to normal priority (`applypriority`), then writes
256 MB as do_bench does - the state do_bench leaves, with no rows of the last rep left. Both
flushes are timed, which shows whether evict_last lines outlive do_bench's.

Run on the GPU: `python bench/l2_reuse.py --out DIR` (about 1 min); prints a table, writes
DIR/l2_reuse.json.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from sweep_kernels import HKV, HQ, PAGE, D, graph_of, paged_case  # noqa: E402

import kernels.decode_attention as da  # noqa: E402
from kernels import SparseDecodeWrapper  # noqa: E402

LAYERS = 16
WEIGHT_ROWS = 3072 + 3072 + 3 * 8192  # a clsa-4b cross layer's Wq, Wo and FFN, as one [rows, d_model] matrix
D_MODEL = HQ * D


FLUSH_BYTES = 256 * 2**20
FLUSH_BLOCK = 1024


@triton.jit
def _read_evict_last(x_ptr, sink_ptr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(sink_ptr + tl.program_id(0), tl.sum(tl.load(x_ptr + offs, eviction_policy="evict_last")))


@triton.jit
def _demote_lines(x_ptr, sink_ptr, BLOCK: tl.constexpr):
    """Each program: BLOCK lines of 128 B (32 int32) of x back to normal L2 priority."""
    lines = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    r = tl.inline_asm_elementwise("applypriority.global.L2::evict_normal [$1], 128;\n\tmov.u32 $0, 0;", "=r,l",
                                  [x_ptr + lines.to(tl.int64) * 32], dtype=tl.int32, is_pure=False, pack=1)
    tl.store(sink_ptr + tl.program_id(0), tl.sum(r))


class Flush:
    """`write`: do_bench's (256 MB of zeros). `full`: evict_last read, demote, then the write."""

    def __init__(self) -> None:
        self.buf = torch.zeros(FLUSH_BYTES // 4, dtype=torch.int32, device="cuda")
        self.zero = torch.empty(FLUSH_BYTES // 4, dtype=torch.int32, device="cuda")
        self.sink = torch.zeros(self.buf.numel() // FLUSH_BLOCK, dtype=torch.int32, device="cuda")

    def __call__(self, mode: str) -> None:
        if mode == "full":
            _read_evict_last[(self.buf.numel() // FLUSH_BLOCK,)](self.buf, self.sink, BLOCK=FLUSH_BLOCK)
            lines = FLUSH_BYTES // 128
            _demote_lines[(lines // FLUSH_BLOCK,)](self.buf, self.sink, BLOCK=FLUSH_BLOCK)
        self.zero.zero_()


FLUSH: list[Flush] = []


def flushed_median_us(fn, mode: str, reps: int = 200) -> float:  # noqa: ANN001
    """Median CUDA-event time of fn() over `reps` reps, each after Flush()(mode)."""
    if not FLUSH:
        FLUSH.append(Flush())
    flush = FLUSH[0]
    for _ in range(10):
        flush(mode)
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        flush(mode)
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    times = sorted(a.elapsed_time(b) for a, b in zip(starts, ends, strict=True))
    return 1000 * times[len(times) // 2]


def timed(fn, modes: tuple[str, ...] = ("full",)) -> dict[str, float]:  # noqa: ANN001
    graph = graph_of(fn)
    return {mode: flushed_median_us(graph.replay, mode) for mode in modes}


def chain(wrapper: SparseDecodeWrapper, q0: torch.Tensor, caches: list, weights: list | None,
          attention: bool = True) -> torch.Tensor:
    """16 layers: attention (or the query passed through) then, with `weights`, a GEMM whose output
    is the next layer's query."""
    batch = q0.shape[0]
    q = q0
    scale = 1 / math.sqrt(D)
    for layer in range(LAYERS):
        k, v = caches[layer % len(caches)]
        x = wrapper.run(q, k, v, scale) if attention else q
        if weights is not None:
            y = F.linear(x.view(batch, D_MODEL), weights[layer])
            q = y[:, :D_MODEL].view(batch, HQ, D)
        else:
            q = x
    return q


def run_batch(batch: int, n: int, gen: torch.Generator, weights: list) -> list[dict]:
    case = paged_case(batch, n, gen)
    shared = [(case["k"], case["v"])]
    distinct = shared + [(torch.randn_like(case["k"]), torch.randn_like(case["v"])) for _ in range(LAYERS - 1)]
    row_mib = 2 * batch * case["idx"].shape[1] * HKV * D * 2 / 2**20
    wrapper = SparseDecodeWrapper("triton")
    wrapper.plan(case["table"], case["lens"], case["idx"], PAGE)
    q0 = case["q"]
    rows = []
    gemm_us = timed(lambda: chain(wrapper, q0, shared, weights, attention=False))["full"]
    outs = {}
    for policy, fraction in (("normal", 0.0), ("evict_last", 1.0)):
        da.L2_RESIDENT_FRACTION = fraction
        outs[policy] = chain(wrapper, q0, shared, weights).float()
        one = timed(lambda: wrapper.run(q0, *shared[0], 1 / math.sqrt(D)), ("full", "write"))
        shared_us = timed(lambda: chain(wrapper, q0, shared, None), ("full", "write"))
        r = {"B": batch, "policy": policy, "rows_MiB_per_layer": row_mib,
             "one_layer_us": one["full"], "one_layer_write_flush_us": one["write"],
             "attn_distinct_us": timed(lambda: chain(wrapper, q0, distinct, None))["full"],
             "attn_shared_us": shared_us["full"], "attn_shared_write_flush_us": shared_us["write"],
             "gemm_only_us": gemm_us,
             "attn_gemm_shared_us": timed(lambda: chain(wrapper, q0, shared, weights))["full"]}
        r["attn_added_us"] = r["attn_gemm_shared_us"] - gemm_us
        rows.append(r)
    same = torch.equal(outs["normal"], outs["evict_last"])
    for r in rows:
        r["outputs_identical"] = same
    da.L2_RESIDENT_FRACTION = 0.5
    del case
    torch.cuda.empty_cache()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="1,2,4")
    p.add_argument("--n", type=int, default=131072)
    p.add_argument("--out", default="/tmp/l2_reuse")
    args = p.parse_args()
    props = torch.cuda.get_device_properties(0)
    print(f"{props.name}: L2 {props.L2_cache_size / 2**20:.0f} MiB, {props.multi_processor_count} SMs", flush=True)
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(WEIGHT_ROWS, D_MODEL, device="cuda", dtype=torch.bfloat16) / math.sqrt(D_MODEL)
               for _ in range(LAYERS)]
    print(f"weights: {LAYERS} x {weights[0].numel() * 2 / 1e6:.0f} MB", flush=True)
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        rows += run_batch(batch, args.n, gen, weights)
        for r in rows[-2:]:
            print(json.dumps(r), flush=True)
    print(f"\n16 cross layers, N={args.n}, us (CUDA graph, median of 200 reps, the full flush before each;"
          " (w): do_bench's write flush)")
    head = ("B", "policy", "rows MiB", "1 layer", "1 layer(w)", "attn distinct", "attn shared", "shared(w)",
            "gemm only", "attn+gemm", "attn added", "same")
    print("".join(f"{h:>14}" for h in head))
    for r in rows:
        vals = (r["B"], r["policy"], f"{r['rows_MiB_per_layer']:.0f}", f"{r['one_layer_us']:.1f}",
                f"{r['one_layer_write_flush_us']:.1f}", f"{r['attn_distinct_us']:.1f}",
                f"{r['attn_shared_us']:.1f}", f"{r['attn_shared_write_flush_us']:.1f}", f"{r['gemm_only_us']:.1f}",
                f"{r['attn_gemm_shared_us']:.1f}", f"{r['attn_added_us']:.1f}", r["outputs_identical"])
        print("".join(f"{v!s:>14}" for v in vals))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "l2_reuse.json").write_text(json.dumps({"device": props.name, "l2_bytes": props.L2_cache_size,
                                                   "n": args.n, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
