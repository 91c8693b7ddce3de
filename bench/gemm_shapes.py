"""The decode step's weight GEMMs on one GPU: how fast cuBLAS streams each clsa-4b weight at small M.

At decode the GEMMs are [M = batch, K] x [K, N] with M <= a few hundred: they only read weights,
so their speed is bytes / time. For every projection shape of clsa-4b and M in --ms, this times a
CUDA graph of 16 calls, each on its own copy of the weight (so every call streams its weight from
HBM, as in the decode step, instead of finding it in L2), for the layouts torch can hand cuBLAS:

  linear      F.linear(x, W), W [N, K] as nn.Linear stores it (what the engine runs)
  matmul_kn   x @ Wt, Wt [K, N] contiguous (cuBLAS picks among other kernels)
  linear_pad  F.linear on M rounded up to a multiple of 16 rows

and prints us per call and the read bandwidth reached.

GPU: python bench/gemm_shapes.py --out DIR   (DIR/gemm_shapes.json)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sweep_kernels import graph_of  # noqa: E402

from services.engine.config import preset  # noqa: E402

COPIES = 16


def shapes() -> dict[str, tuple[int, int]]:
    cfg = preset("clsa-4b")
    d, q, kv = cfg.d_model, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    return {"qkv": (q + 2 * kv, d), "wo": (d, q), "cross_wq": (q, d), "gate_up": (2 * cfg.ffn_dim, d),
            "down": (d, cfg.ffn_dim), "lm_head": (cfg.vocab_size, d)}


def graph_us(fn, calls: int) -> float:  # noqa: ANN001
    """Median us per call of `fn` (which makes `calls` calls) replayed as one CUDA graph."""
    g = graph_of(fn)
    for _ in range(3):
        g.replay()
    times = []
    for _ in range(20):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / calls)
    return sorted(times)[len(times) // 2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ms", nargs="+", type=int, default=[1, 7, 8, 16, 32, 128, 200])
    p.add_argument("--out", default="/tmp/gemm_shapes")
    args = p.parse_args()
    dev = torch.device("cuda")
    rows = []
    print(f"{'shape':>9} {'N':>6} {'K':>5} {'M':>4} " + " ".join(f"{v:>18}" for v in ("linear", "matmul_kn",
                                                                                        "linear_pad")))
    for name, (n, k) in shapes().items():
        ws = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(COPIES)]
        wts = [w.t().contiguous() for w in ws]
        nbytes = n * k * 2
        for m in args.ms:
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            xp = torch.randn(-(-m // 16) * 16, k, device=dev, dtype=torch.bfloat16)
            res = {
                "linear": graph_us(lambda x=x, ws=ws: [F.linear(x, w) for w in ws], COPIES),
                "matmul_kn": graph_us(lambda x=x, wts=wts: [x @ w for w in wts], COPIES),
                "linear_pad": graph_us(lambda xp=xp, ws=ws: [F.linear(xp, w) for w in ws], COPIES),
            }
            row = {"shape": name, "n": n, "k": k, "m": m, "mbytes": nbytes / 1e6,
                   **{f"{key}_us": us for key, us in res.items()},
                   **{f"{key}_tbs": nbytes / us / 1e6 for key, us in res.items()}}
            rows.append(row)
            print(f"{name:>9} {n:>6} {k:>5} {m:>4} " + " ".join(
                f"{us:8.1f}us {nbytes / us / 1e6:5.2f}TB/s" for us in res.values()), flush=True)
        del ws, wts
        torch.cuda.empty_cache()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gemm_shapes.json").write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
