"""One gateway for the session: a real grpc.aio server on a free port, in its own thread and event
loop, in front of the tiny model's in-process engine. Tests talk to it over the socket."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest

from services.engine import EngineConfig, LLMEngine
from services.gateway.backend import LocalEngineBackend
from services.gateway.metrics import GatewayMetrics
from services.gateway.server import pb2_grpc, start_server
from services.transfer.local_redis import free_port


@dataclass
class Gateway:
    address: str
    backend: LocalEngineBackend
    channel: grpc.Channel
    metrics_url: str

    @property
    def stub(self):  # noqa: ANN201
        return pb2_grpc.GenerationStub(self.channel)


@pytest.fixture(scope="session")
def gateway() -> Iterator[Gateway]:
    engine = LLMEngine.from_model("clsa-tiny", EngineConfig(max_num_seqs=16, seed=0))
    backend = LocalEngineBackend(engine, "clsa-tiny", max_in_flight=64)
    metrics = GatewayMetrics(backend)
    metrics_port = free_port()
    metrics.serve_http(metrics_port)
    loop = asyncio.new_event_loop()
    started = threading.Event()
    holder: dict = {}

    def run() -> None:
        asyncio.set_event_loop(loop)
        server, port = loop.run_until_complete(start_server(backend, metrics=metrics))
        holder.update(server=server, port=port)
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert started.wait(30), "gateway did not start"
    channel = grpc.insecure_channel(f"127.0.0.1:{holder['port']}")
    yield Gateway(f"127.0.0.1:{holder['port']}", backend, channel, f"http://127.0.0.1:{metrics_port}/metrics")
    channel.close()
    asyncio.run_coroutine_threadsafe(holder["server"].stop(grace=1), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    backend.stop()
