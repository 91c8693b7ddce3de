"""Plots of bench/decode.py's JSON (run here, on the CPU, after the GPU run).

    python bench/plot_decode.py bench/results/decode/decode.json [--out bench/results/decode/decode.png]

Left: decode throughput (tokens/s) against batch size at the longest context, one line per
variant, each up to the largest batch it fits. Middle: the decode step at that context and the
Transformer's largest batch, split into self layers, shared K/V + index, cross layers and head.
Right: throughput at each variant's largest batch, at every context length.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ORDER = ("transformer", "dense-yoco", "per-layer-topk", "torch-clsa", "clsa")
COLORS = {"transformer": "#7f7f7f", "dense-yoco": "#1f77b4", "per-layer-topk": "#ff7f0e",
          "torch-clsa": "#9467bd", "clsa": "#d62728"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("json")
    p.add_argument("--out")
    args = p.parse_args()
    run = json.loads(Path(args.json).read_text())
    rows = [r for r in run["rows"] if "step_ms" in r]
    n_max = max(r["n"] for r in rows)
    tfit = int(run["transformer_fit"][str(n_max)] if str(n_max) in run["transformer_fit"]
               else run["transformer_fit"][n_max])
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(17, 5))

    for name in ORDER:
        pts = sorted((r["b"], r["tok_s"]) for r in rows if r["variant"] == name and r["n"] == n_max)
        if pts:
            ax1.plot(*zip(*pts, strict=True), "o-", color=COLORS[name], label=name)
    ax1.set(xscale="log", yscale="log", xlabel="batch (sequences)", ylabel="decode tokens/s",
            title=f"decode throughput at N = {n_max // 1024}K")
    ax1.grid(True, which="both", alpha=0.3)
    ax1.legend()

    parts = ("self layers", "shared KV + index", "cross layers", "head", "layers")
    shades = {"self layers": "#aec7e8", "shared KV + index": "#ffbb78", "cross layers": "#ff9896", "head": "#c5b0d5",
              "layers": "#c7c7c7"}
    names = [n for n in ORDER if any(r["variant"] == n and r["n"] == n_max and r["b"] == tfit for r in rows)]
    for i, name in enumerate(names):
        r = next(r for r in rows if r["variant"] == name and r["n"] == n_max and r["b"] == tfit)
        bottom = 0.0
        for part in parts:
            ms = max(0.0, r.get("breakdown_ms", {}).get(part, 0.0))
            if ms:
                ax2.bar(i, ms, bottom=bottom, color=shades[part], label=part if i == names.index(name) else None)
                bottom += ms
        ax2.text(i, r["step_ms"], f"{r['step_ms']:.1f} ms", ha="center", va="bottom", fontsize=9)
    handles = {}
    for part in parts:
        handles[part] = plt.Rectangle((0, 0), 1, 1, color=shades[part])
    ax2.legend(handles.values(), handles.keys(), fontsize=8)
    ax2.set_xticks(range(len(names)), names, rotation=20)
    ax2.set(ylabel="decode step (ms)",
            title=f"one step at N = {n_max // 1024}K, B = {tfit} (the Transformer's largest)")

    ns = sorted({r["n"] for r in rows})
    width = 0.8 / len(ORDER)
    for j, name in enumerate(ORDER):
        best = []
        for n in ns:
            cands = [r for r in rows if r["variant"] == name and r["n"] == n]
            best.append(max(cands, key=lambda r: r["b"])["tok_s"] if cands else 0)
        ax3.bar([i + j * width for i in range(len(ns))], best, width, color=COLORS[name], label=name)
    ax3.set_xticks([i + 0.4 - width / 2 for i in range(len(ns))], [f"{n // 1024}K" for n in ns])
    ax3.set(yscale="log", ylabel="tokens/s at the largest batch that fits", xlabel="context N",
            title="throughput at each variant's largest batch (colors as left)")

    fig.tight_layout()
    out = Path(args.out) if args.out else Path(args.json).with_suffix(".png")
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
