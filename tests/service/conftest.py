"""The disaggregated service, really started once per session: a redis-server, a local Ray
(namespace `clsa`) with one prefill and one decode worker, and the gateway on a free port."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest
import ray

from services.gateway.metrics import GatewayMetrics
from services.gateway.ray_backend import NAMESPACE, RayBackend, start_workers
from services.gateway.server import pb2_grpc, start_server
from services.transfer import TransferLedger, WorkerRegistry
from services.transfer.local_redis import LocalRedis

PREFIX = "clsa-test:"


@dataclass
class Service:
    address: str
    channel: grpc.Channel
    ledger: TransferLedger
    backend: RayBackend
    redis_url: str
    metrics: GatewayMetrics

    @property
    def stub(self):  # noqa: ANN201
        return pb2_grpc.GenerationStub(self.channel)


@pytest.fixture(scope="session")
def service() -> Iterator[Service]:
    redis_server = LocalRedis()
    ray.init(num_cpus=2, include_dashboard=False, namespace=NAMESPACE, logging_level="ERROR",
             log_to_driver=False)
    try:
        prefill, decode = start_workers("clsa-tiny", redis_server.url, PREFIX, 1, 1)
        ledger = TransferLedger.from_url(redis_server.url, prefix=PREFIX)
        registry = WorkerRegistry(ledger.client, prefix=PREFIX)
        backend = RayBackend(prefill, decode, registry, ledger)
        loop = asyncio.new_event_loop()
        started = threading.Event()
        holder: dict = {}

        def run() -> None:
            asyncio.set_event_loop(loop)
            metrics = GatewayMetrics(backend, ledger)
            holder["metrics"] = metrics
            holder["server"], holder["port"] = loop.run_until_complete(start_server(backend, metrics=metrics))
            started.set()
            loop.run_forever()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        assert started.wait(60), "gateway did not start"
        channel = grpc.insecure_channel(f"127.0.0.1:{holder['port']}")
        yield Service(f"127.0.0.1:{holder['port']}", channel, ledger, backend, redis_server.url, holder["metrics"])
        channel.close()
        asyncio.run_coroutine_threadsafe(holder["server"].stop(grace=1), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
    finally:
        ray.shutdown()
        redis_server.stop()
