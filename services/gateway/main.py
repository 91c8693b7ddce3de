"""`clsa serve`: the gateway process. Today it serves one in-process engine (the `local` backend);
the disaggregated backend (Ray prefill/decode workers, Redis-tracked transfers) is issue #4's next
step and plugs in behind the same GenerationBackend interface."""

from __future__ import annotations

import asyncio
import signal
import sys

from services.engine import EngineConfig, LLMEngine
from services.gateway.backend import LocalEngineBackend
from services.gateway.metrics import GatewayMetrics
from services.gateway.server import start_server


async def serve(model: str, host: str, port: int, metrics_port: int, device: str, max_in_flight: int,
                max_num_seqs: int) -> None:
    engine = LLMEngine.from_model(model, EngineConfig(max_num_seqs=max_num_seqs), device=device)
    backend = LocalEngineBackend(engine, model, max_in_flight=max_in_flight)
    metrics = GatewayMetrics(backend)
    metrics.serve_http(metrics_port, host=host)
    server, bound = await start_server(backend, port=port, host=host, metrics=metrics)
    address = f"{host}:{bound}"
    print(f"clsa serving {model} (fingerprint {engine.fingerprint}) on {address}; "
          f"metrics on http://{host}:{metrics_port}/metrics\n"
          f"  .venv/bin/clsa client --address {address} --prompt 'hello' --stream\n"
          f"  grpcurl -plaintext -d '{{\"text\": \"hello\", \"sampling\": {{\"max_tokens\": 8}}}}' "
          f"{address} clsa.v1.Generation/Complete\n"
          f"Ctrl-C stops it.", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    print("clsa: shutting down", file=sys.stderr, flush=True)
    await server.stop(grace=5)
    backend.stop()
