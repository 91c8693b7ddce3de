"""Prefill sliding-window attention on one GPU: the Triton window kernel against SDPA in blocks.

For clsa-4b's self layers (24 query heads, 8 K/V heads, d 128, window 512), bf16, one prompt of T
tokens: the median time of `kernels.window_attention` for each launch configuration in CONFIGS,
and of `layers.sliding_window_attention` (SDPA over blocks of the window with a mask, the K/V
heads repeated), with the largest difference between the two outputs. Then, at the default configuration, the
kernel's grid orders (`WINDOW_HEADS_FIRST`) with and without the queries' RoPE done inside it
(`q_rope`: q unrotated, as the prefill hands it over), each against its rotated-first result.

GPU: python bench/window_attention.py --out DIR   (DIR/window_attention.json)
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from decode import median_ms  # noqa: E402

from services.engine.config import preset  # noqa: E402
from services.engine.layers import sliding_window_attention  # noqa: E402

window_module = importlib.import_module("kernels.window_attention")  # the package exports the function
REPS = 10
CONFIGS = [(128, 64, 8, 2), (128, 64, 4, 3), (128, 128, 8, 2), (64, 64, 4, 3), (128, 32, 4, 3), (64, 128, 4, 2),
           (128, 64, 8, 3), (64, 64, 4, 4), (64, 32, 4, 3)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ts", nargs="+", type=int, default=[8192, 32768, 131072])
    p.add_argument("--out", default="/tmp/window_attention")
    p.add_argument("--no-sweep", action="store_true", help="only the default configuration's grid and RoPE variants")
    args = p.parse_args()
    cfg = preset("clsa-4b")
    hq, hkv, d, w = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.swa_window
    scale = 1 / math.sqrt(d)
    rows = []
    for t in args.ts:
        fused = torch.randn(1, t, (hq + 2 * hkv) * d, device="cuda", dtype=torch.bfloat16)
        q, k, v = fused.split([hq * d, hkv * d, hkv * d], dim=-1)
        q, k, v = q.view(1, t, hq, d), k.view(1, t, hkv, d), v.view(1, t, hkv, d)
        want = sliding_window_attention(q, k, v, w, scale)
        sdpa = median_ms(lambda q=q, k=k, v=v: sliding_window_attention(q, k, v, w, scale), REPS)
        flops = 4 * t * hq * d * min(w, t)  # the window's score and value products
        print(f"T={t:7d}  SDPA in blocks {sdpa:8.3f} ms", flush=True)
        row = {"t": t, "sdpa_blocks_ms": sdpa, "configs": []}
        default_config, default_order = window_module.WINDOW_CONFIG, window_module.WINDOW_HEADS_FIRST
        for config in [] if args.no_sweep else CONFIGS:
            window_module.WINDOW_CONFIG = config
            got = window_module.window_attention(q, k, v, w, scale)
            err = (got.float() - want.float()).abs().max().item()
            ms = median_ms(lambda q=q, k=k, v=v: window_module.window_attention(q, k, v, w, scale), REPS)
            row["configs"].append({"config": config, "ms": ms, "max_abs_diff": err, "tflops": flops / ms / 1e9})
            print(f"  {config}: {ms:8.3f} ms  {flops / ms / 1e9:6.1f} TFLOP/s  {sdpa / ms:5.2f}x SDPA  "
                  f"max |diff| {err:.2e}", flush=True)
        window_module.WINDOW_CONFIG = default_config
        angles = torch.arange(t, device="cuda").float()[:, None] / cfg.rope_theta ** (
            torch.arange(d // 2, device="cuda").float() / (d // 2))
        rope = (angles.cos()[None], angles.sin()[None])
        rotated = window_module.rotate_half(q, *rope)
        want_rotated = window_module.window_attention(rotated, k, v, w, scale)
        row["variants"] = []
        for heads_first in (False, True):
            window_module.WINDOW_HEADS_FIRST = heads_first
            for in_kernel in (False, True):
                args_q = (q, rope) if in_kernel else (rotated, None)
                got = window_module.window_attention(args_q[0], k, v, w, scale, q_rope=args_q[1])
                err = (got.float() - want_rotated.float()).abs().max().item()
                ms = median_ms(lambda a=args_q, k=k, v=v: window_module.window_attention(a[0], k, v, w, scale,
                                                                                         q_rope=a[1]), REPS)
                name = ("heads first" if heads_first else "blocks first") + (", RoPE inside" if in_kernel else "")
                row["variants"].append({"variant": name, "heads_first": heads_first, "rope_in_kernel": in_kernel,
                                        "ms": ms, "max_abs_diff": err})
                print(f"  {str(default_config)} {name:26s}: {ms:8.3f} ms  {flops / ms / 1e9:6.1f} TFLOP/s  "
                      f"max |diff| {err:.2e}", flush=True)
        window_module.WINDOW_HEADS_FIRST = default_order
        rows.append(row)
        del fused, q, k, v, want, rotated, want_rotated
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "window_attention.json").write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows},
                                                          indent=1))


if __name__ == "__main__":
    main()
