"""Test helper: the gateway's grpc.aio server in a thread with its own event loop, so that sync
tests can call it over a real socket."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from services.gateway.backend import GenerationBackend
from services.gateway.metrics import GatewayMetrics
from services.gateway.server import start_server


@contextmanager
def running_gateway(backend: GenerationBackend, metrics: GatewayMetrics) -> Iterator[str]:
    """Yields the address of a started gateway; stops it on exit."""
    loop = asyncio.new_event_loop()
    started = threading.Event()
    holder: dict = {}

    def run() -> None:
        asyncio.set_event_loop(loop)
        holder["server"], holder["port"] = loop.run_until_complete(start_server(backend, metrics=metrics))
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert started.wait(60), "gateway did not start"
    try:
        yield f"127.0.0.1:{holder['port']}"
    finally:
        asyncio.run_coroutine_threadsafe(holder["server"].stop(grace=1), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
