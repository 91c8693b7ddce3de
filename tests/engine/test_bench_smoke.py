"""The GPU benchmark scripts' CPU smoke runs: each completes and writes the tables and JSON a
device run would (tiny shapes; the times mean nothing)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

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
    assert {(r["variant"], r["requests"]) for r in run["e2e"]} == {("transformer", 3), ("clsa", 3)}
    for r in run["e2e"]:  # (the script asserts every request got its 8 tokens) prefill, then decode, then done
        assert r["new_tokens"] == 8 and r["tok_s"] > 0
        assert 0 < r["ttft_median_s"] <= r["prefill_s"] < r["last_token_s"] <= r["wall_s"]
        assert r["decode_step_ms"] > 0
    assert "end to end" in stdout and (tmp_path / "throughput.txt").read_text().count("clsa") >= 2


def test_prefill_smoke_run_writes_its_table(tmp_path: Path) -> None:
    _run("prefill.py", tmp_path)
    rows = json.loads((tmp_path / "prefill.json").read_text())["rows"]
    assert {(r["variant"], r["n"]) for r in rows} == {(v, n) for v in ("transformer", "clsa", "dense-yoco")
                                                      for n in (300, 1000)}
    assert "vs transformer" in (tmp_path / "prefill.txt").read_text()


def test_decode_ab_smoke_run_times_each_setting_every_round(tmp_path: Path) -> None:
    stdout = _run("decode_ab.py", tmp_path, "--setting", "base:", "--setting",
                  "pre2:kernels.skinny_linear.PRE_WAIT_TILES=2,kernels.triton_attention.SPARSE_KV_EVICTION=evict_last,"
                  "kernels.skinny_linear.SKINNY_CONFIGS[(3072, 3072)]=(64, 128, 264, 4, 3)",
                  "--bs", "1", "2", "--rounds", "2")
    run = json.loads((tmp_path / "decode_ab.json").read_text())
    assert list(run["settings"]) == ["base", "pre2"]
    assert run["settings"]["pre2"]["switches"] == [
        "kernels.skinny_linear.PRE_WAIT_TILES=2", "kernels.triton_attention.SPARSE_KV_EVICTION='evict_last'",
        "kernels.skinny_linear.SKINNY_CONFIGS[(3072, 3072)]=(64, 128, 264, 4, 3)"]
    for setting in run["settings"].values():  # one time per round at each batch
        assert {b: len(ts) for b, ts in setting["step_ms"].items()} == {"1": 2, "2": 2}
        assert all(t > 0 for ts in setting["step_ms"].values() for t in ts)
    assert "pre2" in stdout and "(1.000)" in stdout


def test_decode_ab_refuses_an_unknown_switch_before_starting(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "decode_ab.py"), "--smoke", "--out", str(tmp_path),
                           "--setting", "bad:kernels.skinny_linear.NO_SUCH_SWITCH=1"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode != 0 and "kernels.skinny_linear has no NO_SUCH_SWITCH" in done.stderr
    assert not (tmp_path / "decode_ab.json").exists()


def test_decode_ab_puts_each_switch_back_after_its_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    from kernels import skinny_linear

    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import decode_ab

    tiles, configs = skinny_linear.PRE_WAIT_TILES, dict(skinny_linear.SKINNY_CONFIGS)
    _, switches = decode_ab.parse_setting(
        "x:kernels.skinny_linear.PRE_WAIT_TILES=1,kernels.skinny_linear.SKINNY_CONFIGS[(3072,8192)]=(64,128,528,8,3)")
    before = decode_ab.apply(switches)
    assert skinny_linear.PRE_WAIT_TILES == 1 and skinny_linear.SKINNY_CONFIGS[(3072, 8192)] == (64, 128, 528, 8, 3)
    decode_ab.apply(before)
    assert skinny_linear.PRE_WAIT_TILES == tiles and skinny_linear.SKINNY_CONFIGS == configs
    with pytest.raises(argparse.ArgumentTypeError, match="has no key"):
        decode_ab.parse_setting("x:kernels.skinny_linear.SKINNY_CONFIGS[(1,2)]=(64,128,528,8,3)")
    with pytest.raises(argparse.ArgumentTypeError, match="is not a dict"):
        decode_ab.parse_setting("x:kernels.skinny_linear.PRE_WAIT_TILES[0]=1")
