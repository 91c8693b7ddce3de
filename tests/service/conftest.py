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
from services.gateway.ray_backend import NAMESPACE, RayBackend, start_workers
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


def _start_ray(attempts: int = 3) -> None:
    """A local Ray with a small object store (bundles of the tiny model are ~100 KB). Its raylet
    has been seen to miss Ray's fixed 30 s start-up window on a loaded 2-core machine: try again."""
    for attempt in range(1, attempts + 1):
        try:
            ray.init(num_cpus=2, include_dashboard=False, namespace=NAMESPACE, logging_level="ERROR",
                     log_to_driver=False, object_store_memory=256 * 1024 * 1024)
            return
        except Exception:
            ray.shutdown()
            if attempt == attempts:
                raise


@pytest.fixture(scope="session")
def service() -> Iterator[Service]:
    redis_server = LocalRedis()
    try:
        _start_ray()
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
        ray.shutdown()
        redis_server.stop()
