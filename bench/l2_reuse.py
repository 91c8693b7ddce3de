"""Do the 16 cross layers of a step read their rows from L2? All of them read the same selected
rows of the one shared K/V cache (8 MiB a sequence at clsa-4b shapes); between two cross layers
the model streams that layer's weights (189 MB at clsa-4b: Wq, Wo, the SwiGLU FFN) through the
60 MiB L2. This times, at N = 128K, k = 2048, as CUDA graphs of 16 layers (median of do_bench, L2
written over before every rep):

- attention alone, 16 distinct caches (every layer's rows from HBM: bench/kernels.py's chain);
- attention alone on the one shared cache, back to back (CLSA's literal 16 layers);
- the step's cross-layer chain: each layer's attention output through a GEMM over that layer's
  189 MB of weights, whose output is the next layer's query (a true dependency chain), and the
  same GEMMs alone; their difference is what attention adds to the step.

Measured on the H200 (bench/results/l2_reuse.json): the shared cache saves 0.4 us a layer at
B=1 (the chain is latency-bound: 4.8 us a layer with its rows in L2), and loading the rows with L2
priority evict_last (a kernel option tried in commit abecc62, with a flush that also cleared
evict_last lines) changed nothing, with or without the GEMMs between layers.

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
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from sweep_kernels import HKV, HQ, PAGE, D, graph_of, paged_case  # noqa: E402

from kernels import SparseDecodeWrapper  # noqa: E402

LAYERS = 16
WEIGHT_ROWS = 3072 + 3072 + 3 * 8192  # a clsa-4b cross layer's Wq, Wo and FFN, as one [rows, d_model] matrix
D_MODEL = HQ * D


def timed(fn) -> float:  # noqa: ANN001
    graph = graph_of(fn)
    return 1000 * triton.testing.do_bench(graph.replay, warmup=25, rep=200, return_mode="median")


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


def run_batch(batch: int, n: int, gen: torch.Generator, weights: list) -> dict:
    case = paged_case(batch, n, gen)
    shared = [(case["k"], case["v"])]
    distinct = shared + [(torch.randn_like(case["k"]), torch.randn_like(case["v"])) for _ in range(LAYERS - 1)]
    row_mib = 2 * batch * case["idx"].shape[1] * HKV * D * 2 / 2**20
    wrapper = SparseDecodeWrapper("triton")
    wrapper.plan(case["table"], case["lens"], case["idx"], PAGE)
    q0 = case["q"]
    gemm_us = timed(lambda: chain(wrapper, q0, shared, weights, attention=False))
    r = {"B": batch, "rows_MiB_per_layer": row_mib,
         "one_layer_us": timed(lambda: wrapper.run(q0, *shared[0], 1 / math.sqrt(D))),
         "attn_distinct_us": timed(lambda: chain(wrapper, q0, distinct, None)),
         "attn_shared_us": timed(lambda: chain(wrapper, q0, shared, None)),
         "gemm_only_us": gemm_us,
         "attn_gemm_shared_us": timed(lambda: chain(wrapper, q0, shared, weights))}
    r["attn_added_us"] = r["attn_gemm_shared_us"] - gemm_us
    del case
    torch.cuda.empty_cache()
    return r


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
        rows.append(run_batch(batch, args.n, gen, weights))
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n16 cross layers, N={args.n}, us (CUDA graph, do_bench median, L2 written over before each rep)")
    head = ("B", "rows MiB", "1 layer", "attn distinct", "attn shared", "gemm only", "attn+gemm", "attn added")
    print("".join(f"{h:>14}" for h in head))
    for r in rows:
        vals = (r["B"], f"{r['rows_MiB_per_layer']:.0f}", f"{r['one_layer_us']:.1f}", f"{r['attn_distinct_us']:.1f}",
                f"{r['attn_shared_us']:.1f}", f"{r['gemm_only_us']:.1f}", f"{r['attn_gemm_shared_us']:.1f}",
                f"{r['attn_added_us']:.1f}")
        print("".join(f"{v!s:>14}" for v in vals))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "l2_reuse.json").write_text(json.dumps({"device": props.name, "l2_bytes": props.L2_cache_size,
                                                   "n": args.n, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
