"""Plot of bench/kernels.py's JSON (run here, on the CPU, after the GPU run).

    python bench/plot_kernels.py bench/results/kernels.json [--out bench/results/kernels.png]

Left: one sparse layer at the target N (128K) - the bytes per second it streams at each batch,
against a bare contiguous read of the same bytes timed the same way (what any kernel could do at
that size), the torch gather + SDPA baseline, and the target (75% of the read bandwidth measured
over 4 GiB). Right: the attention of a whole decode step, index_topk + 16 sparse layers against
16 dense SDPA layers, at each N and batch the run measured.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SPARSE_TARGET = 0.75


def _sparse_panel(ax: plt.Axes, run: dict) -> None:
    n = run["targets"]["n"]
    read_bw = run["bandwidth"]["read_bw_gbps"]
    bare = {int(nbytes): us for nbytes, us in run["bandwidth"].get("sized_read_us", {}).items()}
    rows = sorted((r for r in run["rows"] if r["op"] == "sparse" and r["n"] == n and r["ours_us"]),
                  key=lambda r: r["b"])
    xs = range(len(rows))
    width = 0.27
    ax.bar([x - width for x in xs], [r["ours_gbps"] for r in rows], width, label="ours (paged, selected rows)",
           color="tab:orange")
    bare_gbps = []
    for r in rows:
        near = [(nb, us) for nb, us in bare.items() if abs(nb - r["bytes"]) < 0.05 * nb]
        bare_gbps.append(near[0][0] / (near[0][1] * 1e-6) / 1e9 if near else 0.0)
    ax.bar(list(xs), bare_gbps, width, label="bare contiguous read, same bytes", color="tab:gray")
    ax.bar([x + width for x in xs], [r["baseline_gbps"] for r in rows], width, label="torch gather + SDPA",
           color="tab:blue")
    ax.axhline(SPARSE_TARGET * read_bw, color="tab:red", linestyle="--",
               label=f"target: {SPARSE_TARGET:.0%} of read BW ({read_bw:,.0f} GB/s)")
    ax.set_xticks(list(xs), [f"B={r['b']}\n{r['bytes'] / 2**20:.0f} MiB" for r in rows])
    ax.set_ylabel("GB/s (useful bytes / time)")
    ax.set_title(f"one sparse layer, N={n // 1024}K, k={run['shape']['k']}")
    ax.legend(fontsize=8, loc="upper left")


def _step_panel(ax: plt.Axes, run: dict) -> None:
    ratios = run["step_ratios"]
    labels = [f"{r['n'] // 1024}K\nB={r['b']}" for r in ratios]
    xs = range(len(ratios))
    ax.bar([x - 0.2 for x in xs], [r["clsa_us"] for r in ratios], 0.4, label="CLSA: index_topk + 16 sparse layers",
           color="tab:orange")
    ax.bar([x + 0.2 for x in xs], [r["dense16_sdpa_us"] for r in ratios], 0.4, label="16 dense SDPA layers",
           color="tab:gray")
    for x, r in zip(xs, ratios, strict=True):
        ax.annotate(f"{r['dense_over_clsa']:.1f}x", (x, r["dense16_sdpa_us"]), ha="center", va="bottom", fontsize=8)
    ax.set_yscale("log")
    ax.set_xticks(list(xs), labels)
    ax.set_ylabel("us per decode step (attention only)")
    ax.set_title("attention of one decode step")
    ax.legend(fontsize=8, loc="upper left")


def plot(run: dict, out: Path) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    _sparse_panel(left, run)
    _step_panel(right, run)
    env = run["env"]
    fig.suptitle(f"{env['device']}, torch {env['torch']}, triton {env['triton']}, {env['date'][:10]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="kernels.json written by bench/kernels.py")
    parser.add_argument("--out", type=Path, help="PNG to write (default: beside the JSON, kernels.png)")
    args = parser.parse_args()
    out = args.out or args.run.with_suffix(".png")
    plot(json.loads(args.run.read_text()), out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
