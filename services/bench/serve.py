"""`clsa bench serve`: a gRPC load generator for the service, in the style of `vllm bench serve`
and `sglang.bench_serving`.

Requests arrive as a Poisson process at `request_rate` per second (`arrival="fixed"`: evenly
spaced at that rate instead; `inf`: all at once), optionally capped at `max_concurrency` in
flight; prompt and output lengths are fixed, uniform or read from a file. Each request streams
through `Generate` with `ignore_eos`, so it produces exactly its output length unless it fails.
Reported: TTFT, TPOT (time per output token after the first), ITL (every gap between streamed
messages), end-to-end latency - mean, median, p90, p99 - request and token throughput, goodput
under the SLOs given, and every request's final status code.

    clsa bench serve --address 127.0.0.1:50051 --num-prompts 200 --request-rate 4 \\
        --input-len uniform:128,1024 --output-len fixed:64 --slo-ttft-ms 2000 --json out.json --plot plots/

The same engine (`run_bench`) drives the fault-injection tests.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc

WORDS = ("the of and to in is that for it as with was on be at by this had not are but from or have an they "
         "which one you were her all she there would their we him been has when who will more no if out so said "
         "what up its about into than them can only other new some could time these two may then do first any "
         "my now such like our over man me even most made after also did many before must through back years "
         "where much your way well down should because each just those people how too little state good very "
         "make world still own see men work long get here between both life being under never day same another "
         "know while last might us great old year off come since against go came right used take three").split()


@dataclass(frozen=True)
class LengthDist:
    """`fixed:N`, `uniform:LO,HI` (inclusive) or `file:PATH` (one integer per line, drawn at random)."""

    kind: str
    values: tuple[int, ...]

    @classmethod
    def parse(cls, spec: str) -> LengthDist:
        kind, _, rest = spec.partition(":")
        try:
            if kind == "fixed":
                values: tuple[int, ...] = (int(rest),)
            elif kind == "uniform":
                lo, hi = (int(x) for x in rest.split(","))
                if lo > hi:
                    raise ValueError
                values = (lo, hi)
            elif kind == "file":
                values = tuple(int(line) for line in Path(rest).read_text().split())
                if not values:
                    raise ValueError
            else:
                raise ValueError
        except (ValueError, OSError):
            raise ValueError(f"length distribution {spec!r}: expected fixed:N, uniform:LO,HI or file:PATH "
                             "(a readable file of integers)") from None
        if min(values) < 1:
            raise ValueError(f"length distribution {spec!r}: lengths must be >= 1")
        return cls(kind, values)

    def draw(self, rng: random.Random) -> int:
        if self.kind == "uniform":
            return rng.randint(self.values[0], self.values[1])
        return rng.choice(self.values)


@dataclass
class BenchConfig:
    address: str = "127.0.0.1:50051"
    num_prompts: int = 100
    request_rate: float = math.inf  # requests per second; inf: all at once
    arrival: str = "poisson"  # "poisson" (exponential gaps) | "fixed" (every 1 / request_rate s)
    max_concurrency: int | None = None
    input_len: str = "fixed:128"
    output_len: str = "fixed:32"
    warmup: int = 2  # requests sent (and awaited) first, not measured
    attention: str | None = None  # "clsa" | "dense" | None (the model's default)
    seed: int = 0
    timeout_s: float = 300.0  # each request's deadline
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None
    slo_e2e_ms: float | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.num_prompts < 1 or self.warmup < 0:
            raise ValueError(f"num_prompts must be >= 1 and warmup >= 0, got {self.num_prompts}, {self.warmup}")
        if not self.request_rate > 0:
            raise ValueError(f"request_rate must be > 0 (inf: all at once), got {self.request_rate}")
        if self.arrival not in ("poisson", "fixed"):
            raise ValueError(f"arrival must be poisson or fixed, got {self.arrival!r}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {self.max_concurrency}")
        if self.attention not in (None, "clsa", "dense"):
            raise ValueError(f"attention must be clsa or dense, got {self.attention!r}")
        LengthDist.parse(self.input_len), LengthDist.parse(self.output_len)


@dataclass
class RequestRecord:
    index: int
    prompt_len: int
    output_len: int  # asked for
    start: float  # seconds since the run began
    status: str = "OK"  # the gRPC status code's name
    detail: str = ""
    ttft: float | None = None
    e2e: float | None = None
    tokens: int = 0  # received
    itl: list[float] = field(default_factory=list)

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.e2e is None or self.tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.tokens - 1)


@dataclass
class BenchResult:
    config: dict[str, Any]
    duration_s: float
    records: list[RequestRecord]

    @property
    def ok(self) -> list[RequestRecord]:
        return [r for r in self.records if r.status == "OK"]

    def status_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for r in self.records:
            counts[r.status] = counts.get(r.status, 0) + 1
        return dict(sorted(counts.items()))

    def summary(self) -> dict[str, Any]:
        ok = self.ok
        out_tokens = sum(r.tokens for r in ok)
        in_tokens = sum(r.prompt_len for r in ok)
        good = [r for r in ok if self._meets_slo(r)]
        ms = 1e3
        return {
            "requests": len(self.records), "completed": len(ok), "status": self.status_counts(),
            "duration_s": self.duration_s,
            "request_throughput": len(ok) / self.duration_s,
            "output_token_throughput": out_tokens / self.duration_s,
            "total_token_throughput": (in_tokens + out_tokens) / self.duration_s,
            "goodput": len(good) / self.duration_s, "good_requests": len(good),
            "ttft_ms": _stats([r.ttft * ms for r in ok if r.ttft is not None]),
            "tpot_ms": _stats([r.tpot * ms for r in ok if r.tpot is not None]),
            "itl_ms": _stats([x * ms for r in ok for x in r.itl]),
            "e2e_ms": _stats([r.e2e * ms for r in ok if r.e2e is not None]),
        }

    def _meets_slo(self, r: RequestRecord) -> bool:
        c = self.config
        checks = [(c["slo_ttft_ms"], r.ttft), (c["slo_tpot_ms"], r.tpot), (c["slo_e2e_ms"], r.e2e)]
        return all(limit is None or (value is not None and value * 1e3 <= limit) for limit, value in checks)

    def to_json(self) -> dict[str, Any]:
        return {"config": self.config, "summary": self.summary(), "requests": [asdict(r) for r in self.records]}

    def table(self) -> str:
        s = self.summary()
        lines = [f"{'requests':<28}{s['requests']} sent, {s['completed']} completed in {s['duration_s']:.2f} s",
                 f"{'status':<28}" + ", ".join(f"{k} {v}" for k, v in s["status"].items()),
                 f"{'request throughput':<28}{s['request_throughput']:.2f} req/s",
                 f"{'output token throughput':<28}{s['output_token_throughput']:.1f} tok/s",
                 f"{'total token throughput':<28}{s['total_token_throughput']:.1f} tok/s"]
        slos = {k: self.config[k] for k in ("slo_ttft_ms", "slo_tpot_ms", "slo_e2e_ms") if self.config[k] is not None}
        if slos:
            lines.append(f"{'goodput':<28}{s['goodput']:.2f} req/s ({s['good_requests']} within "
                         + ", ".join(f"{k[4:-3].upper()} <= {v:g} ms" for k, v in slos.items()) + ")")
        lines.append(f"{'':<10}{'mean':>10}{'median':>10}{'p90':>10}{'p99':>10}   (ms)")
        for name in ("ttft", "tpot", "itl", "e2e"):
            st = s[f"{name}_ms"]
            lines.append(f"{name.upper():<10}" + "".join(
                f"{st[k]:>10.1f}" if st[k] is not None else f"{'-':>10}" for k in ("mean", "median", "p90", "p99")))
        return "\n".join(lines)


def _stats(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "median": None, "p90": None, "p99": None}
    ordered = sorted(values)

    def pct(p: float) -> float:  # nearest rank
        return ordered[min(len(ordered) - 1, max(0, math.ceil(p / 100 * len(ordered)) - 1))]

    return {"mean": statistics.fmean(ordered), "median": statistics.median(ordered), "p90": pct(90), "p99": pct(99)}


def make_prompt(n_tokens: int, rng: random.Random) -> str:
    """Text of exactly `n_tokens` bytes (the byte-level tokenizer's tokens): random common words."""
    words: list[str] = []
    size = 0
    while size < n_tokens:
        words.append(rng.choice(WORDS))
        size += len(words[-1]) + 1
    return " ".join(words)[:n_tokens].ljust(n_tokens, ".")


async def run_bench_async(cfg: BenchConfig, pb2: Any, stub: Any) -> BenchResult:
    rng = random.Random(cfg.seed)
    inputs, outputs = LengthDist.parse(cfg.input_len), LengthDist.parse(cfg.output_len)
    plan = [(make_prompt(n, rng), n, outputs.draw(rng)) for n in (inputs.draw(rng) for _ in range(cfg.num_prompts))]
    attention = {None: pb2.ATTENTION_MODE_UNSPECIFIED, "clsa": pb2.ATTENTION_MODE_CLSA,
                 "dense": pb2.ATTENTION_MODE_DENSE}[cfg.attention]

    def request(prompt: str, max_tokens: int) -> Any:
        return pb2.GenerateRequest(text=prompt, attention=attention,
                                   sampling=pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=True,
                                                               temperature=0.0))

    for i in range(cfg.warmup):
        prompt, _, out_len = plan[i % len(plan)]
        try:
            async for _ in stub.Generate(request(prompt, min(out_len, 4)), timeout=cfg.timeout_s):
                pass
        except grpc.aio.AioRpcError as e:
            raise RuntimeError(f"warm-up request failed: {e.code().name}: {e.details()}") from None

    bar = _progress(cfg)
    limit = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None
    t0 = time.perf_counter()
    records: list[RequestRecord] = []

    async def one(i: int, prompt: str, n_in: int, n_out: int) -> None:
        if limit is not None:
            await limit.acquire()
        rec = RequestRecord(i, n_in, n_out, time.perf_counter() - t0)
        records.append(rec)
        start = time.perf_counter()
        last = start
        try:
            async for msg in stub.Generate(request(prompt, n_out), timeout=cfg.timeout_s):
                now = time.perf_counter()
                if msg.token_ids:
                    if rec.ttft is None:
                        rec.ttft = now - start
                    else:
                        rec.itl.append(now - last)
                    last = now
                rec.tokens += len(msg.token_ids)
            rec.e2e = time.perf_counter() - start
        except grpc.aio.AioRpcError as e:
            rec.status, rec.detail = e.code().name, e.details() or ""
        except asyncio.CancelledError:
            rec.status = "CANCELLED"
            raise
        finally:
            if limit is not None:
                limit.release()
            bar.update(1)

    tasks = []
    for i, (prompt, n_in, n_out) in enumerate(plan):
        tasks.append(asyncio.create_task(one(i, prompt, n_in, n_out)))
        if math.isfinite(cfg.request_rate) and i + 1 < len(plan):
            gap = rng.expovariate(cfg.request_rate) if cfg.arrival == "poisson" else 1 / cfg.request_rate
            await asyncio.sleep(gap)
    await asyncio.gather(*tasks)
    duration = time.perf_counter() - t0
    bar.close()
    records.sort(key=lambda r: r.index)
    config = asdict(cfg)
    if not math.isfinite(cfg.request_rate):
        config["request_rate"] = "inf"  # JSON has no infinity
    return BenchResult(config, duration, records)


def wait_serving(address: str, process: subprocess.Popen | None = None, timeout_s: float = 60) -> None:
    """Block until the gRPC health service at `address` reports SERVING (all workers up). Raises
    RuntimeError when `process` (the server, if we started it) exits first or time runs out."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"the server exited with {process.returncode} before it was SERVING")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == \
                        health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise RuntimeError(f"{address} was not SERVING after {timeout_s} s")


def run_bench(cfg: BenchConfig) -> BenchResult:
    """Run the benchmark against the gateway at cfg.address (its own event loop and channel)."""
    from services.api.stubs import load

    pb2, pb2_grpc = load()

    async def main() -> BenchResult:
        async with grpc.aio.insecure_channel(cfg.address) as channel:
            try:
                await asyncio.wait_for(channel.channel_ready(), timeout=10)
            except TimeoutError:
                raise ConnectionError(f"no gRPC server answers at {cfg.address}") from None
            return await run_bench_async(cfg, pb2, pb2_grpc.GenerationStub(channel))

    return asyncio.run(main())


def _progress(cfg: BenchConfig) -> Any:
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if cfg.progress and tqdm is not None:
        return tqdm(total=cfg.num_prompts, desc="bench serve", unit="req", dynamic_ncols=True)

    class Quiet:
        def update(self, n: int) -> None: ...

        def close(self) -> None: ...

    return Quiet()


def write_plots(result: BenchResult, directory: Path) -> list[Path]:
    """ttft_itl.png (the distributions, as CDFs) and timeline.png (each request's TTFT and
    end-to-end latency against when it was sent, failures marked)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    ok = result.ok
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, values in (("TTFT", [r.ttft for r in ok if r.ttft is not None]),
                         ("ITL", [x for r in ok for x in r.itl]),
                         ("end to end", [r.e2e for r in ok if r.e2e is not None])):
        if values:
            xs = sorted(v * 1e3 for v in values)
            ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], label=name)
    ax.set_xscale("log")
    ax.set_xlabel("ms")
    ax.set_ylabel("share of requests (ITL: of gaps)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    cdf = directory / "ttft_itl.png"
    fig.savefig(cdf, dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, pairs in (("end to end", [(r.start, r.e2e) for r in ok if r.e2e is not None]),
                        ("TTFT", [(r.start, r.ttft) for r in ok if r.ttft is not None])):
        ax.scatter([x for x, _ in pairs], [y * 1e3 for _, y in pairs], s=10, label=name)
    failed = [r for r in result.records if r.status != "OK"]
    if failed:
        ax.scatter([r.start for r in failed], [1.0] * len(failed), marker="x", color="red",
                   label=f"failed ({len(failed)})")
    ax.set_yscale("log")
    ax.set_xlabel("sent at (s)")
    ax.set_ylabel("ms")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    timeline = directory / "timeline.png"
    fig.savefig(timeline, dpi=120)
    plt.close(fig)
    return [cdf, timeline]


def main_from_args(args: Any) -> int:
    cfg = BenchConfig(address=args.address, num_prompts=args.num_prompts, request_rate=args.request_rate,
                      arrival=args.arrival,
                      max_concurrency=args.max_concurrency, input_len=args.input_len, output_len=args.output_len,
                      warmup=args.warmup, attention=args.attention, seed=args.seed, timeout_s=args.timeout,
                      slo_ttft_ms=args.slo_ttft_ms, slo_tpot_ms=args.slo_tpot_ms, slo_e2e_ms=args.slo_e2e_ms,
                      progress=not args.quiet)
    result = run_bench(cfg)
    print(result.table())
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_json(), indent=1))
        print(f"wrote {args.json}")
    if args.plot:
        print("wrote " + ", ".join(str(p) for p in write_plots(result, Path(args.plot))))
    return 0
