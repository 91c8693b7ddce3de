"""How fast can any kernel read N bytes in one call, timed the way bench/kernels.py times an op?

The sparse-attention target asks one layer at B=8 (64 MiB of selected K/V rows) for 75% of the
card's read bandwidth, which bench/kernels.py measures over 4 GiB. This times the best of a grid of
plain contiguous-read Triton kernels (a sum of bf16 values, 16-byte loads; programs per SM, block
size, warps and persistence swept) and torch's sum, each as one CUDA-graph replay (median of
do_bench, L2 written over before every rep) and as 16 back-to-back reads in one graph, over 8, 64
and 256 MiB - a contiguous read is the easiest way to move those bytes, so its time is a floor for
any kernel that must move them.

Run on the GPU: `python bench/read_floor.py --out DIR` (about 1 min); prints a table, writes
DIR/read_floor.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch
import triton
import triton.language as tl
import triton.testing
from sweep_kernels import graph_of

SIZES_MIB = (8, 64, 256)
BW_BYTES = 4 * 2**30


@triton.jit
def _read_kernel(x_ptr, sink_ptr, n, chunk, BLOCK: tl.constexpr):
    """Program p sums x[p * chunk : (p + 1) * chunk] (chunk a multiple of BLOCK) and stores it."""
    start = tl.program_id(0).to(tl.int64) * chunk
    acc = tl.zeros([BLOCK], tl.float32)
    for off in range(0, chunk, BLOCK):
        offs = start + off + tl.arange(0, BLOCK)
        acc += tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
    tl.store(sink_ptr + tl.program_id(0), tl.sum(acc))


def us(fn) -> float:  # noqa: ANN001
    return 1000 * triton.testing.do_bench(graph_of(fn).replay, warmup=25, rep=100, return_mode="median")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="/tmp/read_floor")
    args = p.parse_args()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    big = torch.randn(BW_BYTES // 2, device="cuda", dtype=torch.bfloat16)
    read_bw = BW_BYTES / (us(big.sum) * 1e-6) / 1e9
    print(f"read BW (torch sum over 4 GiB) {read_bw:.0f} GB/s, {sms} SMs", flush=True)
    sink = torch.empty(sms * 64, device="cuda", dtype=torch.float32)
    results = []
    for mib in SIZES_MIB:
        n = mib * 2**20 // 2
        parts = [big[i * n:(i + 1) * n] for i in range(16)]
        x = parts[0]

        def variants(n: int = n):  # noqa: ANN202
            yield "torch sum", lambda t: t.sum()
            for per_sm, block, warps in itertools.product((1, 2, 4, 8, 16, 32), (1024, 2048, 4096, 8192), (4, 8)):
                programs = per_sm * sms
                chunk = triton.cdiv(triton.cdiv(n, programs), block) * block
                programs = triton.cdiv(n, chunk)
                if programs > sink.numel():
                    continue

                def launch(t, chunk=chunk, programs=programs, block=block, warps=warps):  # noqa: ANN001, ANN202
                    _read_kernel[(programs,)](t, sink, t.numel(), chunk, BLOCK=block, num_warps=warps)
                yield f"triton {per_sm}/SM block {block} warps {warps}", launch  # noqa: B023 (bound as defaults)

        best = None
        for name, launch in variants():
            one = us(lambda launch=launch, x=x: launch(x))
            chain = us(lambda launch=launch, parts=parts: [launch(t) for t in parts]) / 16
            pct = 100 * mib * 2**20 / 1e3 / read_bw  # percent of read BW at 1 us
            r = {"MiB": mib, "variant": name, "one_us": one, "one_pct": pct / one, "chain_us": chain,
                 "chain_pct": pct / chain}
            results.append(r)
            if best is None or one < best["one_us"]:
                best = r
        print(f"{mib:4d} MiB  best one call: {best['variant']:36s} {best['one_us']:7.1f} us = {best['one_pct']:5.1f}%"
              f" of read BW   (16 back to back: {min(r['chain_us'] for r in results if r['MiB'] == mib):.1f} us each)",
              flush=True)
        torch_row = next(r for r in results if r["MiB"] == mib and r["variant"] == "torch sum")
        print(f"          torch sum one call {torch_row['one_us']:.1f} us = {torch_row['one_pct']:.1f}%", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "read_floor.json").write_text(json.dumps({"read_bw_gbps": read_bw, "results": results}, indent=1))


if __name__ == "__main__":
    main()
