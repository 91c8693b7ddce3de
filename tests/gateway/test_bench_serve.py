"""`clsa bench serve` against a real gateway: every request accounted for, latencies consistent
with each other, the admission limit's refusals counted by status, JSON and plots written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from services.bench.serve import BenchConfig, LengthDist, RequestRecord, _stats, make_prompt, run_bench
from tests.gateway.conftest import Gateway

CLSA = str(Path(sys.executable).parent / "clsa")


def test_a_capped_poisson_run_completes_every_request_with_consistent_numbers(gateway: Gateway) -> None:
    cfg = BenchConfig(address=gateway.address, num_prompts=12, request_rate=40.0, max_concurrency=4,
                      input_len="uniform:20,60", output_len="fixed:5", warmup=1, slo_ttft_ms=60_000, progress=False)
    result = run_bench(cfg)
    s = result.summary()
    assert s["status"] == {"OK": 12} and s["completed"] == 12 and s["good_requests"] == 12
    for r in result.records:
        assert r.tokens == 5 and len(r.itl) == 4  # ignore_eos: exactly the output length, streamed
        assert r.ttft is not None and r.e2e is not None and 0 < r.ttft <= r.e2e
        assert 20 <= r.prompt_len <= 60
    assert s["ttft_ms"]["median"] <= s["e2e_ms"]["median"] and s["output_token_throughput"] > 0
    assert s["ttft_ms"]["p99"] >= s["ttft_ms"]["p90"] >= s["ttft_ms"]["median"]
    assert "TTFT" in result.table() and "goodput" in result.table()


def test_a_fixed_rate_spaces_the_requests_evenly(gateway: Gateway) -> None:
    cfg = BenchConfig(address=gateway.address, num_prompts=5, request_rate=10.0, arrival="fixed",
                      input_len="fixed:20", output_len="fixed:2", warmup=0, progress=False)
    result = run_bench(cfg)
    assert result.status_counts() == {"OK": 5}
    starts = [r.start for r in sorted(result.records, key=lambda r: r.index)]
    assert all(b - a >= 0.08 for a, b in zip(starts, starts[1:])), starts  # 0.1 s apart, never bunched
    with pytest.raises(ValueError, match="arrival must be poisson or fixed"):
        BenchConfig(arrival="gamma")


def test_a_burst_past_the_admission_limit_is_shed_and_counted(gateway: Gateway,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gateway.backend, "max_in_flight", 3)
    cfg = BenchConfig(address=gateway.address, num_prompts=20, output_len="fixed:40", warmup=0, progress=False)
    result = run_bench(cfg)
    counts = result.status_counts()
    assert set(counts) == {"OK", "RESOURCE_EXHAUSTED"} and counts["OK"] >= 3 and sum(counts.values()) == 20
    assert all("requests in flight (max 3)" in r.detail for r in result.records if r.status != "OK")
    assert gateway.backend.stats()["requests_in_flight"] == 0


def test_cli_writes_the_table_json_and_plots(gateway: Gateway, tmp_path: Path) -> None:
    proc = subprocess.run([CLSA, "bench", "serve", "--address", gateway.address, "--num-prompts", "6",
                           "--request-rate", "50", "--input-len", "fixed:30", "--output-len", "fixed:4",
                           "--slo-ttft-ms", "30000", "--json", str(tmp_path / "b.json"), "--plot", str(tmp_path),
                           "--quiet"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "request throughput" in proc.stdout and "ITL" in proc.stdout
    data = json.loads((tmp_path / "b.json").read_text())
    assert data["summary"]["completed"] == 6 and len(data["requests"]) == 6
    assert (tmp_path / "ttft_itl.png").stat().st_size > 0 and (tmp_path / "timeline.png").stat().st_size > 0


def test_cli_refuses_bad_arguments_and_a_dead_address() -> None:
    proc = subprocess.run([CLSA, "bench", "serve", "--input-len", "normal:5"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and "fixed:N, uniform:LO,HI or file:PATH" in proc.stderr
    proc = subprocess.run([CLSA, "bench", "serve", "--address", "127.0.0.1:1", "--num-prompts", "1"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "no gRPC server answers at 127.0.0.1:1" in proc.stderr


def test_lengths_prompts_and_percentiles(tmp_path: Path) -> None:
    import random

    assert LengthDist.parse("fixed:7").draw(random.Random(0)) == 7
    assert {LengthDist.parse("uniform:3,5").draw(random.Random(i)) for i in range(50)} == {3, 4, 5}
    (tmp_path / "lens").write_text("10\n20\n")
    assert LengthDist.parse(f"file:{tmp_path / 'lens'}").draw(random.Random(1)) in (10, 20)
    for bad in ("uniform:5,3", "fixed:0", "file:/nonexistent", "fixed:x"):
        with pytest.raises(ValueError):
            LengthDist.parse(bad)
    assert all(len(make_prompt(n, random.Random(n))) == n for n in (1, 5, 64, 1000))
    st = _stats([float(x) for x in range(1, 101)])
    assert (st["median"], st["p90"], st["p99"]) == (50.5, 90.0, 99.0)
    assert RequestRecord(0, 1, 1, 0.0, ttft=0.1, e2e=0.5, tokens=5).tpot == pytest.approx(0.1)
