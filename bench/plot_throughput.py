"""Plots of bench/throughput.py's JSON (run here, on the CPU, after the GPU run).

    python bench/plot_throughput.py bench/results/decode/throughput.json [--out .../throughput.png]

Left: steady-state decode throughput at each variant's largest batch (log scale, the batch on each
bar). Right: end-to-end generated tokens/s of the prefill + T tokens workload, split into the time
spent in prefill and in decode, for each request count R.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from plot_decode import COLORS, ORDER  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("json")
    p.add_argument("--out")
    args = p.parse_args()
    run = json.loads(Path(args.json).read_text())
    steady = {r["variant"]: r for r in run["steady"] if "tok_s" in r}
    e2e = run["e2e"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 5))

    names = [n for n in ORDER if n in steady]
    bars = ax1.bar(names, [steady[n]["tok_s"] for n in names], color=[COLORS[n] for n in names])
    for bar, name in zip(bars, names, strict=True):
        ax1.annotate(f"B={steady[name]['b']}\n{steady[name]['tok_s']:,.0f}", (bar.get_x() + bar.get_width() / 2,
                     bar.get_height()), ha="center", va="bottom", fontsize=8)
    ax1.set_yscale("log")
    if names:
        ax1.set_ylim(top=max(steady[n]["tok_s"] for n in names) * 4)  # room for the labels
    ax1.set_ylabel("decode tokens/s")
    n = next(iter(steady.values()))["n"] if steady else 0
    ax1.set_title(f"steady-state decode at the largest batch that fits, N = {n // 1024}K")
    ax1.tick_params(axis="x", rotation=20)

    counts = sorted({r["requests"] for r in e2e})
    width = 0.8 / max(1, len(counts))
    for j, r_count in enumerate(counts):
        rows = {r["variant"]: r for r in e2e if r["requests"] == r_count}
        xs = [i + j * width for i, name in enumerate(ORDER) if name in rows]
        vals = [rows[name]["tok_s"] for name in ORDER if name in rows]
        bars = ax2.bar(xs, vals, width, color=[COLORS[name] for name in ORDER if name in rows],
                       alpha=1.0 if j == 0 else 0.55, edgecolor="black", linewidth=0.5)
        for bar, name in zip(bars, [name for name in ORDER if name in rows], strict=True):
            share = rows[name]["prefill_s"] / rows[name]["wall_s"]
            ax2.annotate(f"R={r_count}\n{share:.0%} prefill", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                         ha="center", va="bottom", fontsize=7)
    ax2.set_xticks([i + width * (len(counts) - 1) / 2 for i in range(len(ORDER))], ORDER, rotation=20)
    ax2.set_ylabel("generated tokens/s (wall clock)")
    if e2e:
        ax2.set_ylim(top=max(r["tok_s"] for r in e2e) * 1.15)
    t = e2e[0]["new_tokens"] if e2e else 0
    ax2.set_title(f"end to end: R prompts of {n // 1024}K tokens + {t} generated each")
    fig.tight_layout()
    out = Path(args.out) if args.out else Path(args.json).with_suffix(".png")
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
