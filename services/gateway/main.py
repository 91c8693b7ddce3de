"""`clsa serve`: the gateway process and what it needs.

`--backend ray` (default): a private `redis-server` unless `--redis-url` is given, a local Ray
unless `--ray-address` is given, `--prefill-workers` + `--decode-workers` Ray actors, the ledger's
reaper, and the gateway. `--backend local`: one in-process engine, nothing else. SIGINT/SIGTERM
shut all of it down.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass

from services.engine import EngineConfig, LLMEngine
from services.gateway.backend import GenerationBackend, LocalEngineBackend
from services.gateway.metrics import GatewayMetrics
from services.gateway.server import start_server
from services.transfer import TransferRecord

REAP_EVERY_S = 1.0


@dataclass(frozen=True)
class ServeConfig:
    model: str
    host: str = "127.0.0.1"
    port: int = 50051
    metrics_port: int = 9090
    device: str = "cpu"
    backend: str = "ray"
    prefill_workers: int = 1
    decode_workers: int = 1
    redis_url: str | None = None
    ray_address: str | None = None
    prefix: str = "clsa:"
    max_in_flight: int = 256
    max_num_seqs: int = 16

    def __post_init__(self) -> None:
        if self.backend not in ("ray", "local"):
            raise ValueError(f"--backend must be 'ray' or 'local', got {self.backend!r}")
        if self.prefill_workers < 1 or self.decode_workers < 1:
            raise ValueError("--prefill-workers and --decode-workers must be >= 1")


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


async def serve(cfg: ServeConfig) -> None:
    with ExitStack() as stack:
        backend, reaper = _start_backend(cfg, stack)
        metrics = GatewayMetrics(backend, getattr(backend, "ledger", None))
        try:
            metrics.serve_http(cfg.metrics_port, host=cfg.host)
        except OSError as e:
            raise ValueError(f"--metrics-port {cfg.metrics_port}: {e.strerror or e}") from None
        try:
            server, bound = await start_server(backend, port=cfg.port, host=cfg.host, metrics=metrics)
        except RuntimeError as e:
            raise ValueError(f"--port {cfg.port}: cannot listen on {cfg.host}:{cfg.port} ({e})") from None
        address = f"{cfg.host}:{bound}"
        summary = backend.model_summary()
        _log(f"clsa serving {cfg.model} (fingerprint {summary.fingerprint}, backend {cfg.backend}) on {address}; "
             f"metrics on http://{cfg.host}:{cfg.metrics_port}/metrics\n"
             f"  .venv/bin/clsa client --address {address} --prompt 'hello' --stream\n"
             f"  grpcurl -plaintext -d '{{\"text\": \"hello\", \"sampling\": {{\"max_tokens\": 8}}}}' "
             f"{address} clsa.v1.Generation/Complete\n"
             + (f"  .venv/bin/clsa transfers --redis-url {reaper.url}\n" if reaper else "")
             + "Ctrl-C stops it.")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        reaping = asyncio.create_task(reaper.run()) if reaper else None
        await stop.wait()
        _log("clsa: shutting down")
        if reaping:
            reaping.cancel()
        await server.stop(grace=5)


@dataclass
class Reaper:
    """Expires transfers past their deadline (a dead worker's, an abandoned claim's) and frees
    their bundles' handles."""

    url: str
    prefix: str
    release: Callable[[TransferRecord], None] | None = None

    async def run(self) -> None:
        from services.transfer import TransferLedger

        ledger = TransferLedger.from_url(self.url, prefix=self.prefix)
        while True:
            try:
                for transfer_id in await asyncio.to_thread(ledger.reap, self.release):
                    _log(f"clsa: transfer {transfer_id} expired")
            except Exception as e:  # noqa: BLE001 -- Redis away for a moment: try again next round
                _log(f"clsa: reaper: {e}")
            await asyncio.sleep(REAP_EVERY_S)


def _start_backend(cfg: ServeConfig, stack: ExitStack) -> tuple[GenerationBackend, Reaper | None]:
    if cfg.backend == "local":
        engine = LLMEngine.from_model(cfg.model, EngineConfig(max_num_seqs=cfg.max_num_seqs), device=cfg.device)
        local = LocalEngineBackend(engine, cfg.model, max_in_flight=cfg.max_in_flight)
        stack.callback(local.stop)
        return local, None

    import ray

    from services.engine.checkpoint import load_tokenizer_for
    from services.gateway.ray_backend import NAMESPACE, RayBackend, start_workers
    from services.transfer import WorkerRegistry
    from services.transfer.ledger import TransferLedger
    from services.transfer.local_redis import LocalRedis

    redis_url = cfg.redis_url
    if redis_url is None:
        redis_server = LocalRedis()
        stack.callback(redis_server.stop)
        redis_url = redis_server.url
        _log(f"clsa: started redis-server at {redis_url}")
    ray.init(address=cfg.ray_address, namespace=NAMESPACE, include_dashboard=False, logging_level=logging.ERROR)
    stack.callback(ray.shutdown)
    _log(f"clsa: starting {cfg.prefill_workers} prefill and {cfg.decode_workers} decode workers on Ray")
    prefill, decode = start_workers(cfg.model, redis_url, cfg.prefix, cfg.prefill_workers, cfg.decode_workers,
                                    cfg.device)
    ledger = TransferLedger.from_url(redis_url, prefix=cfg.prefix)
    registry = WorkerRegistry(ledger.client, prefix=cfg.prefix)
    backend = RayBackend(prefill, decode, registry, ledger, cfg.max_in_flight, tokenizer=load_tokenizer_for(cfg.model))
    return backend, Reaper(redis_url, cfg.prefix, backend.release)
