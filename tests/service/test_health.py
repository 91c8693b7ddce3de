"""Health follows the workers: NOT_SERVING once no decode worker heartbeats, SERVING again with one."""

from __future__ import annotations

import time

import grpc
import pytest
import ray
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.gateway.ray_backend import start_decode_worker
from services.gateway.server import pb2
from tests.service.conftest import PREFIX, Service


def _status(service: Service) -> int:
    stub = health_pb2_grpc.HealthStub(service.channel)
    return stub.Check(health_pb2.HealthCheckRequest(service="clsa.v1.Generation"), timeout=5).status


def _wait_for(service: Service, status: int, timeout_s: float = 30) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _status(service) == status:
            return True
        time.sleep(0.2)
    return False


def test_health_goes_not_serving_without_decode_workers_and_back(service: Service) -> None:
    assert _status(service) == health_pb2.HealthCheckResponse.SERVING
    [(name, worker)] = service.backend.decode.items()
    ray.kill(worker, no_restart=True)
    assert _wait_for(service, health_pb2.HealthCheckResponse.NOT_SERVING)
    with pytest.raises(grpc.RpcError) as err:
        service.stub.Complete(_request(), timeout=30)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "no decode worker is alive" in err.value.details()
    service.backend.decode[name] = start_decode_worker(0, "clsa-tiny", service.redis_url, PREFIX)
    assert _wait_for(service, health_pb2.HealthCheckResponse.SERVING)
    assert service.stub.Complete(_request(), timeout=60).usage.completion_tokens == 4


def _request() -> pb2.GenerateRequest:
    return pb2.GenerateRequest(text="hello", sampling=pb2.SamplingParams(max_tokens=4, ignore_eos=True))
