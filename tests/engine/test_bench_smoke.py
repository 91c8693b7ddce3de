"""The GPU benchmark scripts' CPU smoke runs: each completes and writes the tables and JSON a
device run would (tiny shapes; the times mean nothing)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(script: str, out: Path, *extra: str) -> str:
    done = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--smoke", "--out", str(out), *extra],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_throughput_smoke_run_reports_every_variant(tmp_path: Path) -> None:
    stdout = _run("throughput.py", tmp_path, "--variants", "transformer", "clsa")
    run = json.loads((tmp_path / "throughput.json").read_text())
    assert not run["partial"]
    assert {r["variant"] for r in run["steady"]} == {"transformer", "clsa"}
    assert all(r["finite"] and r["tok_s"] > 0 for r in run["steady"])
    for r in run["e2e"]:  # every request generated all its tokens; the phases add up to the wall time
        assert r["new_tokens"] == 8 and r["tok_s"] == r["requests"] * 8 / r["wall_s"]
        assert abs(r["prefill_s"] + r["decode_s"] - r["wall_s"]) < 1e-6
    assert "end to end" in stdout and (tmp_path / "throughput.txt").read_text().count("clsa") >= 2


def test_prefill_smoke_run_writes_its_table(tmp_path: Path) -> None:
    _run("prefill.py", tmp_path)
    rows = json.loads((tmp_path / "prefill.json").read_text())["rows"]
    assert {(r["variant"], r["n"]) for r in rows} == {(v, n) for v in ("transformer", "clsa", "dense-yoco")
                                                      for n in (300, 1000)}
    assert "vs transformer" in (tmp_path / "prefill.txt").read_text()
