"""The disaggregated service, really started once per session: a redis-server, a local Ray
(namespace `clsa`) with one prefill and one decode worker, and the gateway on a free port."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest
import ray

from services.engine.checkpoint import load_tokenizer_for
from services.gateway.metrics import GatewayMetrics
from services.gateway.ray_backend import RayBackend, start_workers
from services.gateway.server import pb2_grpc
from services.transfer import TransferLedger, WorkerRegistry
from services.transfer.local_redis import LocalRedis
from tests.grpc_server import running_gateway

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
def service(ray_session: object) -> Iterator[Service]:
    redis_server = LocalRedis()
    prefill: list = []
    decode: list = []
    try:
        prefill, decode = start_workers("clsa-tiny", redis_server.url, PREFIX, 1, 1)
        ledger = TransferLedger.from_url(redis_server.url, prefix=PREFIX)
        registry = WorkerRegistry(ledger.client, prefix=PREFIX)
        backend = RayBackend(prefill, decode, registry, ledger, tokenizer=load_tokenizer_for("clsa-tiny"))
        metrics = GatewayMetrics(backend, ledger)
        with running_gateway(backend, metrics) as address:
            channel = grpc.insecure_channel(address)
            yield Service(address, channel, ledger, backend, redis_server.url, metrics)
            channel.close()
    finally:
        for worker in [*prefill, *decode]:
            ray.kill(worker, no_restart=True)
        redis_server.stop()
