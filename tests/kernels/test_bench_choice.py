"""bench/kernels.py --wide-from: which sparse kernel the benchmark runs, from the wide sweep's table."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

choose_wide = runpy.run_path(str(Path(__file__).resolve().parents[2] / "bench" / "kernels.py"),
                             run_name="bench_kernels")["choose_wide"]


def _rows(per_head: dict[int, float], wide: dict[str, dict[int, float]]) -> list[dict]:
    rows = [{"B": b, "variant": "per-head (default)", "us_1": us} for b, us in per_head.items()]
    for variant, times in wide.items():
        rows += [{"B": b, "variant": f"wide {variant}", "us_1": us} for b, us in times.items()]
    return rows


@pytest.mark.parametrize(("wide", "want"), [
    # faster from B=8 up; two configurations: the lower mean ratio over B = 8, 32 wins
    ({"[8, 8, 4, 3, 2, False]": {8: 25.0, 32: 80.0}, "[16, 8, 4, 2, 1, False]": {8: 24.0, 32: 79.0},
      "[8, 8, 4, 3, 2, True]": {1: 14.0}}, (8, (16, 8, 4, 2, 1))),
    # faster everywhere, with PDL at B=1 (where the kernels use it): from B=1
    ({"[8, 8, 4, 3, 2, True]": {1: 12.0}, "[8, 8, 4, 3, 2, False]": {1: 99.0, 8: 25.0, 32: 80.0}},
     (1, (8, 8, 4, 3, 2))),
    # faster at B=8 only: not at every larger batch, so never
    ({"[8, 8, 4, 3, 2, False]": {8: 25.0, 32: 90.0}}, None),
    # faster only at B=32
    ({"[8, 8, 4, 3, 2, False]": {8: 35.0, 32: 80.0}}, (32, (8, 8, 4, 3, 2))),
    ({}, None),
])
def test_wide_kernel_chosen_from_the_batch_where_it_wins(wide: dict, want: tuple | None) -> None:
    assert choose_wide(_rows({1: 13.0, 8: 34.0, 32: 86.0}, wide), pdl_max_batch=1) == want


def test_benchmark_runs_with_the_sweeps_choice(tmp_path: Path) -> None:
    """The CPU smoke run of bench/kernels.py with --wide-from: the choice is read and reported, and
    the sparse kernels run (it once failed to import the package when given the flag)."""
    import json
    import os
    import subprocess
    import sys

    sweep = tmp_path / "sparse_wide.json"
    sweep.write_text(json.dumps(_rows({1: 13.0, 8: 34.0, 32: 86.0},
                                      {"[4, 2, 1, 1, 1, False]": {8: 30.0, 32: 80.0}})))
    bench = Path(__file__).resolve().parents[2] / "bench" / "kernels.py"
    done = subprocess.run([sys.executable, str(bench), "--smoke", "--only", "sparse", "--wide-from", str(sweep),
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TRITON_INTERPRET": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    report = (tmp_path / "kernels.txt").read_text()
    assert "wide [4, 2, 1, 1, 1] (tokens, heads, warps, stages, programs/SM) at B >= 8" in report
    assert json.loads((tmp_path / "kernels.json").read_text())


def test_kernel_plot_from_the_committed_h200_run(tmp_path: Path) -> None:
    """bench/plot_kernels.py draws the committed benchmark JSON (the figure in docs/kernels.md)."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "kernels.png"
    done = subprocess.run([sys.executable, str(root / "bench" / "plot_kernels.py"),
                           str(root / "bench" / "results" / "kernels.json"), "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 20_000
