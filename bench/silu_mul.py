"""The prefill's SwiGLU gate pass, silu(gate) * up over a stacked gate/up output [M, 2F], timed
three ways on one GPU: torch's eager ops, inductor's fused kernel (torch.compile), and our Triton
kernel (kernels.silu_mul) in each launch configuration of a small sweep. Prints a table of time
and bandwidth (bytes moved: read 2F, write F per row); writes DIR/silu_mul.json.

GPU: python bench/silu_mul.py --out DIR   (clsa-4b's F = 8192; --rows, default 128K)
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

from decode import median_ms  # noqa: E402

import kernels.silu_mul as silu_module  # noqa: E402

CONFIGS = [(1, 1024, 4), (2, 1024, 4), (4, 1024, 4), (8, 1024, 8), (4, 2048, 8), (8, 512, 4), (16, 256, 4)]


def time_us(fn) -> float:  # noqa: ANN001
    """Median of 10 CUDA-event-timed calls after warm-ups (bench/decode.py's timer), in us."""
    return median_ms(fn, 10) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=128 * 1024)
    p.add_argument("--ffn", type=int, default=8192)
    p.add_argument("--out", default="/tmp/silu_mul")
    args = p.parse_args()
    x = torch.randn(args.rows, 2 * args.ffn, device="cuda", dtype=torch.bfloat16)
    moved = 3 * args.rows * args.ffn * x.element_size()
    want = silu_module.silu_mul_reference(x)

    def eager() -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up
    compiled = torch.compile(eager)
    rows = [{"path": "torch eager", "us": time_us(eager)},
            {"path": "inductor (torch.compile)", "us": time_us(compiled)}]
    for config in CONFIGS:
        silu_module.SILU_MUL_CONFIG = config
        got = silu_module.silu_mul(x)
        err = float((got.float() - want.float()).abs().max())
        rows.append({"path": f"triton {config}", "config": config, "us": time_us(lambda: silu_module.silu_mul(x)),
                     "max_abs_err": err})
    print(f"== silu(gate) * up, M = {args.rows}, F = {args.ffn}, bf16 ({moved / 2**30:.2f} GiB moved)")
    print(f"{'path':>28} {'us':>10} {'TB/s':>7}")
    for r in rows:
        r["tb_s"] = moved / r["us"] / 1e6
        print(f"{r['path']:>28} {r['us']:>10.1f} {r['tb_s']:>7.2f}" + (f"  err {r['max_abs_err']:.1e}"
                                                                      if "max_abs_err" in r else ""))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "silu_mul.json").write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": args.rows,
                                                   "ffn": args.ffn, "results": rows}, indent=1))


if __name__ == "__main__":
    main()
