"""One call of each decode kernel at N = 128K (clsa-4b heads, bf16) between cudaProfilerStart and
Stop, for Nsight Compute (`ncu --profile-from-start off`): the hardware counters behind the
timings in docs/kernels.md. Warm-up calls (compilation, autotuning caches) run outside the range.

    ncu --profile-from-start off --clock-control none --section SpeedOfLight \\
        --section MemoryWorkloadAnalysis --section Occupancy --section WarpStateStats \\
        python bench/profile_kernels.py [--batches 1,8]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path[:] = [p for p in sys.path if Path(p).resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels import SparseDecodeWrapper, index_topk  # noqa: E402

HQ, HKV, D, D_IDX, K, PAGE, N = 24, 8, 128, 128, 2048, 16, 131072


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=lambda v: [int(x) for x in v.split(",")], default=[1, 8])
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    for batch in args.batches:
        blocks = batch * N // PAGE
        table = torch.randperm(blocks, generator=gen).view(batch, N // PAGE).int().cuda()
        lens = torch.full((batch,), N, dtype=torch.int32, device="cuda")
        k = torch.randn(blocks, PAGE, HKV, D, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        kidx = torch.randn(blocks, PAGE, D_IDX, device="cuda", dtype=torch.bfloat16)
        q = torch.randn(batch, HQ, D, device="cuda", dtype=torch.bfloat16)
        qidx = torch.randn(batch, D_IDX, device="cuda", dtype=torch.bfloat16)
        idx = index_topk(qidx, kidx, table, lens, K)
        wrapper = SparseDecodeWrapper("triton")
        wrapper.plan(table, lens, idx, PAGE)
        for _ in range(3):
            index_topk(qidx, kidx, table, lens, K)
            wrapper.run(q, k, v, 1 / math.sqrt(D))
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
        index_topk(qidx, kidx, table, lens, K)
        wrapper.run(q, k, v, 1 / math.sqrt(D))
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
        print(f"profiled B={batch}: index_topk, then one sparse layer", flush=True)
        del k, v, kidx
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
