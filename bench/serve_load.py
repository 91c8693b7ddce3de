"""The highest request rate the CPU demo sustains: `clsa bench serve` at rising Poisson rates
against the service `make serve` starts (the shipped model, a private redis-server, a local Ray
with one prefill and one decode worker, the gateway), in one run.

    python bench/serve_load.py --out bench/results/serve            # ~10 min on 2 cores
    python bench/serve_load.py --rates 0.5,1,2 --num-prompts 20 --model clsa-tiny --out /tmp/load

For each rate: requests sent, completed, failed by status, TTFT / TPOT / e2e (median and p99),
throughput and goodput under the SLO; the sustained rate is the highest one with no error and p99
TTFT within the SLO. Writes load.json (every run's summary) and load.png (latency against rate).
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p).resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.bench.serve import BenchConfig, run_bench, wait_serving  # noqa: E402
from services.transfer.local_redis import free_port  # noqa: E402

CLSA = str(Path(sys.executable).parent / "clsa")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/clsa-small")
    parser.add_argument("--rates", default="0.25,0.5,1,1.5,2,3", help="requests per second, comma-separated")
    parser.add_argument("--num-prompts", type=int, default=40, help="per rate")
    parser.add_argument("--input-len", default="uniform:128,1024")
    parser.add_argument("--output-len", default="fixed:32")
    parser.add_argument("--slo-ttft-ms", type=float, default=2000.0)
    parser.add_argument("--out", default="bench/results/serve")
    args = parser.parse_args()
    rates = [float(r) for r in args.rates.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    address = f"127.0.0.1:{port}"
    log = open(out / "serve.log", "w")  # noqa: SIM115 -- open for the server's whole life
    proc = subprocess.Popen([CLSA, "serve", "--model", args.model, "--port", str(port), "--metrics-port",
                             str(free_port())], stdout=log, stderr=subprocess.STDOUT)
    runs = []
    try:
        wait_serving(address, proc, timeout_s=180)
        for i, rate in enumerate(rates):
            cfg = BenchConfig(address=address, num_prompts=args.num_prompts, request_rate=rate,
                              input_len=args.input_len, output_len=args.output_len, warmup=2 if i == 0 else 0,
                              seed=i, slo_ttft_ms=args.slo_ttft_ms, timeout_s=600, progress=True)
            result = run_bench(cfg)
            summary = result.summary()
            runs.append({"rate": rate, **summary})
            print(f"\n== {rate:g} req/s\n{result.table()}", flush=True)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        log.close()
    sustained = [r["rate"] for r in runs if r["completed"] == r["requests"] and r["ttft_ms"]["p99"] is not None
                 and r["ttft_ms"]["p99"] <= args.slo_ttft_ms]
    report = {"model": args.model, "input_len": args.input_len, "output_len": args.output_len,
              "num_prompts_per_rate": args.num_prompts, "slo_ttft_ms": args.slo_ttft_ms,
              "sustained_rate": max(sustained) if sustained else None, "runs": runs}
    (out / "load.json").write_text(json.dumps(report, indent=1))
    print(f"\n{'rate':>6} {'sent':>5} {'ok':>5} {'errors':>14} {'TTFT med':>9} {'TTFT p99':>9} {'TPOT med':>9} "
          f"{'e2e p99':>9} {'req/s':>6} {'tok/s':>7} {'goodput':>8}")
    for r in runs:
        errors = ",".join(f"{k} {v}" for k, v in r["status"].items() if k != "OK") or "0"
        t, p, e = r["ttft_ms"], r["tpot_ms"], r["e2e_ms"]
        print(f"{r['rate']:>6g} {r['requests']:>5} {r['completed']:>5} {errors:>14} {_ms(t['median'])} {_ms(t['p99'])} "
              f"{_ms(p['median'])} {_ms(e['p99'])} {r['request_throughput']:>6.2f} "
              f"{r['output_token_throughput']:>7.1f} {r['goodput']:>8.2f}")
    print(f"sustained (no errors, p99 TTFT <= {args.slo_ttft_ms:g} ms): {report['sustained_rate']} req/s")
    plot(report, out / "load.png")
    print(f"wrote {out / 'load.json'}, {out / 'load.png'}")


def _ms(v: float | None) -> str:
    return f"{v:>9.0f}" if v is not None else f"{'-':>9}"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report["runs"]
    rates = [r["rate"] for r in runs]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("ttft_ms", "TTFT"), ("e2e_ms", "end-to-end")):
        ax.plot(rates, [r[key]["median"] for r in runs], "o-", label=f"{label} median")
        ax.plot(rates, [r[key]["p99"] for r in runs], "s--", label=f"{label} p99")
    ax.axhline(report["slo_ttft_ms"], color="grey", lw=0.8, ls=":", label="TTFT SLO")
    if report["sustained_rate"] is not None:
        ax.axvline(report["sustained_rate"], color="green", lw=0.8, ls=":", label="sustained")
    ax.set_xlabel("request rate (req/s, Poisson)")
    ax.set_ylabel("ms")
    ax.set_yscale("log")
    ax.set_title(f"{Path(report['model']).name} on the CPU demo: input {report['input_len']}, "
                 f"output {report['output_len']}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
