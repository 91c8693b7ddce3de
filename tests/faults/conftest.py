"""A second deployment for the fault-injection suite, really started once per session: its own
redis-server (which a test restarts), 2 prefill + 2 decode Ray workers in their own namespace
(`clsa-faults`, Ray restarts them after the crashes the tests inject; each decode worker with a
pool of DECODE_BLOCKS KV blocks, so long prompts can exhaust it), and the gateway.

With CLSA_FAULT_REPORT=PATH each case's measured outcome (requests sent, by final status, leaked
transfers and KV blocks when the invariants were checked, how long the service took to settle)
is written there as JSON at the end of the session: docs/reliability.md's table."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
import ray

from services.engine.checkpoint import load_tokenizer_for
from services.gateway.metrics import GatewayMetrics
from services.gateway.ray_backend import RayBackend, start_workers
from services.gateway.server import pb2, pb2_grpc
from services.transfer import TransferLedger, TransferState, WorkerRegistry
from services.transfer.local_redis import LocalRedis
from tests.grpc_server import running_gateway

PREFIX = "clsa-faults:"
NAMESPACE = "clsa-faults"
MAX_IN_FLIGHT = 24
DECODE_BLOCKS = 320  # per decode worker: 5,120 tokens of clsa-tiny at 16 tokens a block
BLOCK_SIZE = 16
LIVE = (TransferState.PENDING, TransferState.READY, TransferState.CLAIMED)


@dataclass
class FaultyService:
    address: str
    channel: grpc.Channel
    redis: LocalRedis
    ledger: TransferLedger
    registry: WorkerRegistry
    backend: RayBackend
    prefill: list[Any]
    decode: list[Any]
    report: list[dict[str, Any]]

    @property
    def stub(self):  # noqa: ANN201
        return pb2_grpc.GenerationStub(self.channel)

    def restart_redis(self, down_s: float) -> None:
        """Stop the redis-server, leave it down `down_s` seconds, start an empty one on the same port."""
        port = self.redis.port
        self.redis.stop()
        time.sleep(down_s)
        self.redis = LocalRedis(port=port)

    def wait_workers_live(self, timeout_s: float = 90) -> None:
        """Every worker answers (restarted where it crashed) and heartbeats in the registry, so that
        the gateway routes to it again."""
        deadline = time.monotonic() + timeout_s
        while True:  # a restarting actor refuses calls (ActorUnavailableError) until it is back
            try:
                ray.get([w.stats.remote() for w in self.decode] + [w.tokenize.remote("x") for w in self.prefill],
                        timeout=timeout_s)
                break
            except ray.exceptions.ActorUnavailableError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        while time.monotonic() < deadline:
            try:  # live, and heartbeating since the gateway last found it lost: it gets work again
                live = {w.worker_id for w in self.registry.live_workers()
                        if w.heartbeat_ms > self.backend._lost.get(w.worker_id, -1)}
            except Exception:  # noqa: BLE001 - Redis coming back
                live = set()
            if live >= {f"clsa-prefill-{i}" for i in range(len(self.prefill))} | {
                    f"clsa-decode-{i}" for i in range(len(self.decode))}:
                return
            time.sleep(0.2)
        raise AssertionError(f"workers not all live after {timeout_s} s")

    def clear_faults(self) -> None:
        """Disarm what a case armed and did not fire (restarted workers come back disarmed)."""
        self.wait_workers_live()
        ray.get([w.inject_fault.remote(None) for w in self.prefill + self.decode], timeout=120)

    def decode_stats(self, timeout_s: float = 60) -> list[dict[str, int]]:
        return ray.get([w.stats.remote() for w in self.decode], timeout=timeout_s)

    def check_invariants(self, timeout_s: float = 60) -> dict[str, Any]:
        """What every fault case ends with: no transfer record outside a terminal state, no KV block
        in use on any decode worker, no request in flight at the gateway, and a new request served.
        Returns what was measured: the leaks left (0, or it raised) and the seconds to settle."""
        t0 = time.monotonic()
        self.clear_faults()
        deadline = time.monotonic() + timeout_s
        while True:
            live = self.ledger.records(LIVE)
            stats = self.decode_stats(timeout_s)  # all up: waited above
            busy = [s for s in stats if s["kv_blocks_used"] or s["requests_in_flight"] or s.get("requests_waiting")]
            if not live and not busy and self.backend._in_flight == 0:
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"leaked: transfers {[(r.transfer_id, r.state.name) for r in live]}, "
                                     f"decode stats {stats}, gateway in flight {self.backend._in_flight}")
            time.sleep(0.2)
        settled = time.monotonic() - t0
        out = self.stub.Complete(pb2.GenerateRequest(text="still serving?", sampling=pb2.SamplingParams(
            max_tokens=4, ignore_eos=True)), timeout=60)
        assert len(out.token_ids) == 4
        return {"leaked_transfers": len(live), "leaked_kv_blocks": sum(s["kv_blocks_used"] for s in stats),
                "settle_s": round(settled, 1), "served_after": True}

    def outcome(self, case: str, statuses: dict[str, int], invariants: dict[str, Any], **extra: Any) -> None:
        """One row of the suite's report."""
        self.report.append({"case": case, "sent": sum(statuses.values()), "status": dict(sorted(statuses.items())),
                            **invariants, **extra})


@pytest.fixture(scope="session")
def faulty(ray_session: object) -> Iterator[FaultyService]:
    redis_server = LocalRedis()
    prefill: list[Any] = []
    decode: list[Any] = []
    try:
        prefill, decode = start_workers("clsa-tiny", redis_server.url, PREFIX, 2, 2, max_restarts=20,
                                        namespace=NAMESPACE, decode_num_blocks=DECODE_BLOCKS)
        ledger = TransferLedger.from_url(redis_server.url, prefix=PREFIX)
        registry = WorkerRegistry(ledger.client, prefix=PREFIX)
        backend = RayBackend(prefill, decode, registry, ledger, max_in_flight=MAX_IN_FLIGHT,
                             tokenizer=load_tokenizer_for("clsa-tiny"))
        with running_gateway(backend, GatewayMetrics(backend, ledger)) as address:
            channel = grpc.insecure_channel(address)
            svc = FaultyService(address, channel, redis_server, ledger, registry, backend, prefill, decode, [])
            svc.wait_workers_live()
            yield svc
            channel.close()
            redis_server = svc.redis
            if os.environ.get("CLSA_FAULT_REPORT"):
                with open(os.environ["CLSA_FAULT_REPORT"], "w") as f:
                    json.dump(svc.report, f, indent=1)
    finally:
        for worker in [*prefill, *decode]:
            ray.kill(worker, no_restart=True)
        redis_server.stop()


@pytest.fixture()
def svc(faulty: FaultyService) -> Iterator[FaultyService]:
    """The deployment, healthy before the case (each case ends with `check_invariants`); the faults
    a case armed but did not fire are cleared after it."""
    faulty.wait_workers_live()
    yield faulty
    faulty.clear_faults()
