"""The small-batch sparse layer's load order, alone and in a chain of 16: K and V of a block issued
together (`triton_attention.KV_TOGETHER`, the default) or V after K's copy into shared memory (the
kernel before it), each with or without the next block's rows loaded a block ahead
(`SPARSE_ROWS_AHEAD`).

Each setting is checked against the reference first; then one layer alone (a graph of one call)
and per call in a graph of 16 calls that cycle over distinct K/V caches (L2-cold rows, as between
the step's GEMMs), at 128K and B = 1 and 7 (`--bs`). The settings alternate over `--rounds`
rounds; the table shows each setting's median.

Run on the GPU: `python bench/sparse_loads.py` (about 40 s on an H100); writes sparse_loads.json.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

import torch
from sweep_kernels import PAGE, D, _chain_inputs, _read_bw, graph_us, paged_case

import kernels.triton_attention as ta
from kernels import SparseDecodeWrapper

SETTINGS = {  # name: (KV_TOGETHER, SPARSE_ROWS_AHEAD)
    "K/V apart (before)": (False, False),
    "K/V together (default)": (True, False),
    "apart + rows ahead": (False, True),
    "together + rows ahead": (True, True),
}


def time_batch(batch: int, rounds: int, read_bw: float, gen: torch.Generator) -> list[dict]:
    case = paged_case(batch, 131072, gen)
    ref, caches, qs, nbytes = _chain_inputs(case, batch)
    while len(caches) < 3:  # at B = 7 (58.7 MB a layer) two other caches between reads of one keep it L2-cold
        caches.append((torch.randn_like(case["k"]), torch.randn_like(case["v"])))
    scale = 1 / math.sqrt(D)
    w = SparseDecodeWrapper("triton")
    w.plan(case["table"], case["lens"], case["idx"], PAGE)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in SETTINGS}
    errors: dict[str, float] = {}
    saved = ta.KV_TOGETHER, ta.SPARSE_ROWS_AHEAD
    try:
        for _ in range(rounds):
            for name, (together, rows_ahead) in SETTINGS.items():
                ta.KV_TOGETHER, ta.SPARSE_ROWS_AHEAD = together, rows_ahead
                out = w.run(case["q"], case["k"], case["v"], scale)
                torch.cuda.synchronize()
                errors[name] = ((out.float() - ref).norm() / ref.norm()).item()
                one = graph_us(lambda: w.run(case["q"], case["k"], case["v"], scale))
                chain = graph_us(lambda: [w.run(qs[i], *caches[i % len(caches)], scale) for i in range(16)]) / 16
                times[name].append((one, chain))
    finally:
        ta.KV_TOGETHER, ta.SPARSE_ROWS_AHEAD = saved
    rows = []
    for name, runs in times.items():
        one = statistics.median(t[0] for t in runs)
        chain = statistics.median(t[1] for t in runs)
        rows.append({"B": batch, "setting": name, "err": round(errors[name], 5), "us_1": round(one, 2),
                     "us_per_call_of_16": round(chain, 2),
                     "pct_bw_chain": round(100 * nbytes / chain / 1e3 / read_bw, 1),
                     "runs": [[round(a, 2), round(b, 2)] for a, b in runs]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bs", type=int, nargs="+", default=[7, 1])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/sparse_loads.py times kernels on a GPU: no CUDA device here")
    gen = torch.Generator().manual_seed(0)
    read_bw = _read_bw()
    results = []
    print(f"{torch.cuda.get_device_name()}, read bandwidth {read_bw / 1e3:.2f} TB/s; 128K, {args.rounds} rounds")
    print(f"{'B':>2} {'setting':<24} {'rel err':>8} {'1 call us':>10} {'chain us/call':>14} {'%BW':>6}")
    for batch in args.bs:
        rows = time_batch(batch, args.rounds, read_bw, gen)
        for r in rows:
            print(f"{r['B']:>2} {r['setting']:<24} {r['err']:>8.5f} {r['us_1']:>10.2f} {r['us_per_call_of_16']:>14.2f} "
                  f"{r['pct_bw_chain']:>6.1f}", flush=True)
        results += rows
        torch.cuda.empty_cache()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sparse_loads.json").write_text(json.dumps({"device": torch.cuda.get_device_name(), "read_bw_GBps":
                                                       round(read_bw), "results": results}, indent=1))


if __name__ == "__main__":
    main()
