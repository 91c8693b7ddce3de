"""Plots for docs/quality.md from `clsa eval` JSON files (run here, on the CPU, after the GPU runs).

    python bench/plot_quality.py DIR     (reads DIR/passkey-*.json and DIR/recall-*.json)

Writes DIR/passkey.png (accuracy against context length, DENSE and CLSA, one line per model file
and mode) and DIR/recall.png (share of the dense attention mass covered against k, per model file
and length).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _column(cell: dict) -> str:
    k = cell.get("index_topk")
    if k is not None and k == max(1, cell["length"] // 16):
        return "CLSA k=N/16"
    return "DENSE" if k is None else f"CLSA k={k}"


STYLE: dict[str, dict[str, Any]] = {"DENSE": dict(color="black", linewidth=5, alpha=0.25, marker="o", markersize=9),
         "CLSA k=N/16": dict(color="tab:orange", linestyle="--", marker="s"),
         "CLSA k=512": dict(color="tab:blue", linestyle=":", marker="^")}
TITLES = {"trained": "before indexer distillation", "distilled": "after indexer distillation"}


def plot_passkey(files: list[Path], out: Path) -> None:
    """One panel per model file (before / after distillation); DENSE drawn wide and pale, so the
    CLSA lines on top of it stay visible where they agree."""
    fig, axes = plt.subplots(1, len(files), figsize=(5.5 * len(files), 4.2), sharey=True, squeeze=False)
    for ax, path in zip(axes[0], sorted(files, key=lambda p: "distilled" in p.stem)):
        tag = path.stem.removeprefix("passkey-")
        by: dict[str, dict[int, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
        for cell in json.loads(path.read_text())["cells"]:
            acc = by[_column(cell)][cell["length"]]
            acc[0] += cell["correct"]
            acc[1] += cell["trials"]
        for mode, series in by.items():
            xs = sorted(series)
            ax.plot(xs, [100 * series[x][0] / series[x][1] for x in xs], label=mode, **STYLE.get(mode, {}))
        ax.set_title(TITLES.get(tag, tag), fontsize=10)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylim(-4, 104)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="center right")
    axes[0][0].set_ylabel("pass-key accuracy (%)")
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def plot_recall(files: list[Path], out: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for path in files:
        tag = path.stem.removeprefix("recall-")
        by: dict[int, list[dict]] = defaultdict(list)
        for cell in json.loads(path.read_text())["cells"]:
            by[cell["length"]].append(cell)
        for length, cells in sorted(by.items()):
            cells.sort(key=lambda c: c["k"])
            ax.plot([c["k"] for c in cells], [100 * c["recall"] for c in cells], marker="o", label=f"{tag}: N={length}")
            ax.plot([c["k"] for c in cells], [100 * c["random"] for c in cells], linestyle=":", color="grey")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k (selected positions)")
    ax.set_ylabel("dense attention mass covered (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, title="dotted: k random positions", title_fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dir", type=Path)
    args = parser.parse_args()
    passkey, recall = sorted(args.dir.glob("passkey-*.json")), sorted(args.dir.glob("recall-*.json"))
    if not passkey and not recall:
        raise SystemExit(f"no passkey-*.json or recall-*.json under {args.dir}")
    if passkey:
        plot_passkey(passkey, args.dir / "passkey.png")
    if recall:
        plot_recall(recall, args.dir / "recall.png")
    print(f"wrote {', '.join(p for p, f in (('passkey.png', passkey), ('recall.png', recall)) if f)} in {args.dir}")


if __name__ == "__main__":
    main()
