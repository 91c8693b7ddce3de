"""One gateway for the session: a real grpc.aio server on a free port, in its own thread and event
loop, in front of the tiny model's in-process engine. Tests talk to it over the socket."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest

from services.engine import EngineConfig, LLMEngine
from services.gateway.backend import LocalEngineBackend
from services.gateway.metrics import GatewayMetrics
from services.gateway.server import pb2_grpc
from services.transfer.local_redis import free_port
from tests.grpc_server import running_gateway


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
    with running_gateway(backend, metrics) as address:
        channel = grpc.insecure_channel(address)
        yield Gateway(address, backend, channel, f"http://127.0.0.1:{metrics_port}/metrics")
        channel.close()
    backend.stop()
