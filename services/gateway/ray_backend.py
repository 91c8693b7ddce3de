"""The disaggregated backend: Ray prefill and decode workers, transfers tracked in Redis.

    gateway --prefill.remote--> clsa-prefill-<i>   (first token, bundle handle, ledger READY)
            --generate.remote-> clsa-decode-<j>    (claims, pulls, DONE; streams tokens back)

Workers are picked least-loaded first from the registry's heartbeats. A stream the client drops is
cancelled on the decode worker, which aborts the request and frees its KV.
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import ray

from services.decode.worker import DecodeWorker
from services.engine import RequestOutput
from services.engine.tokenizer import Tokenizer
from services.gateway.backend import AdmissionQueueFull, BackendUnavailable, ModelSummary
from services.gateway.convert import GenerationRequest
from services.prefill.worker import PrefillWorker
from services.transfer import LedgerError, TransferLedger, TransferRecord, WorkerRegistry
from services.transfer.registry import Role

NAMESPACE = "clsa"


def start_prefill_worker(i: int, model: str, redis_url: str, prefix: str, device: str = "cpu",
                         max_restarts: int = 2) -> Any:
    """The named actor `clsa-prefill-<i>` (namespace `clsa`); Ray restarts it up to `max_restarts`."""
    cls: Any = ray.remote(num_cpus=0, num_gpus=1 if device == "cuda" else 0, max_restarts=max_restarts)(PrefillWorker)
    return cls.options(name=f"clsa-prefill-{i}", namespace=NAMESPACE).remote(
        f"clsa-prefill-{i}", model, redis_url, prefix, device)


def start_decode_worker(i: int, model: str, redis_url: str, prefix: str, device: str = "cpu",
                        max_restarts: int = 2) -> Any:
    """The named async actor `clsa-decode-<i>` (Ray runs up to 1,000 of its calls at once)."""
    cls: Any = ray.remote(num_cpus=0, num_gpus=1 if device == "cuda" else 0, max_restarts=max_restarts)(DecodeWorker)
    return cls.options(name=f"clsa-decode-{i}", namespace=NAMESPACE).remote(
        f"clsa-decode-{i}", model, redis_url, prefix, device)


def start_workers(model: str, redis_url: str, prefix: str, n_prefill: int, n_decode: int,
                  device: str = "cpu") -> tuple[list[Any], list[Any]]:
    """`n_prefill` + `n_decode` workers (ray.init first); refuses workers that disagree on the model.
    A crashed worker is restarted by Ray; calls in flight on it fail."""
    prefill = [start_prefill_worker(i, model, redis_url, prefix, device) for i in range(n_prefill)]
    decode = [start_decode_worker(i, model, redis_url, prefix, device) for i in range(n_decode)]
    summaries = ray.get([w.model_summary.remote() for w in prefill])
    fingerprints = {s.fingerprint for s in summaries} | set(ray.get([w.fingerprint.remote() for w in decode]))
    if len(fingerprints) != 1:
        raise RuntimeError(f"workers disagree on the model: fingerprints {sorted(fingerprints)}")
    return prefill, decode


class RayBackend:
    def __init__(self, prefill: list[Any], decode: list[Any], registry: WorkerRegistry, ledger: TransferLedger,
                 max_in_flight: int = 256, tokenizer: Tokenizer | None = None) -> None:
        """`tokenizer`: the model's, to count prompt tokens here (else a prefill worker is asked,
        behind whatever prefill it is running)."""
        if not prefill or not decode:
            raise ValueError("need at least one prefill and one decode worker")
        self.max_in_flight = max_in_flight
        self._in_flight = 0
        self.prefill = {f"clsa-prefill-{i}": w for i, w in enumerate(prefill)}
        self.decode = {f"clsa-decode-{i}": w for i, w in enumerate(decode)}
        self.registry = registry
        self.ledger = ledger
        self._handles: dict[str, list[Any]] = {}  # transfer id -> the bundle's handle, while in flight
        self._summary: ModelSummary = ray.get(prefill[0].model_summary.remote())
        self._round_robin = itertools.count()
        self._tokenizer = tokenizer

    async def generate(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        if self._in_flight >= self.max_in_flight:
            raise AdmissionQueueFull(f"{self._in_flight} requests in flight (max {self.max_in_flight})")
        self._in_flight += 1
        try:
            async for out in self._generate(replace(request, request_id=request.request_id or uuid.uuid4().hex)):
                yield out
        finally:
            self._in_flight -= 1

    async def _generate(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        producer = self._pick("prefill", self.prefill)
        consumer = self._pick("decode", self.decode)  # none alive: UNAVAILABLE before any prefill work
        transfer_id = self.ledger.create(request.request_id, self._name(producer), self._summary.fingerprint)
        stream, finished = None, False
        try:
            submitted = time.time()
            result = await producer.prefill.remote(request, transfer_id)
            first = result["first"]
            first.stage_ms["queue"] = max(0.0, (result["started_at"] - submitted) * 1e3)
            finished = first.finished
            yield first
            if result["bundle"] is None:
                return
            self._handles[transfer_id] = result["bundle"]
            stream = consumer.generate.remote(request, transfer_id, result["bundle"])
            del result
            async for ref in stream:
                out = await ref
                finished = out.finished
                if finished:
                    out.stage_ms["transfer"] = float(self.ledger.get(transfer_id).transfer_ms)
                yield out
        finally:
            self._handles.pop(transfer_id, None)
            if not finished:
                # Ended early (cancel, deadline, a failed prefill, no decode worker): stop the decode
                # side and settle the record now, not when the reaper finds it. A record a worker has
                # already settled refuses the transition, which is fine.
                if stream is not None:
                    ray.cancel(stream)
                try:
                    self.ledger.fail(transfer_id, "gateway: the request ended before it finished")
                except LedgerError:
                    pass

    @property
    def handles_in_flight(self) -> int:
        return len(self._handles)

    def release(self, record: TransferRecord) -> None:
        """The reaper's callback: drop the gateway's handle of an expired transfer's bundle (Ray frees
        the object once no one holds it)."""
        self._handles.pop(record.transfer_id, None)

    def _name(self, worker: Any) -> str:
        return next(name for name, w in self.prefill.items() if w is worker)

    def _pick(self, role: Role, workers: dict[str, Any]) -> Any:
        """The least-loaded live worker (by its last heartbeat); ties take turns."""
        live = [w for w in self.registry.live_workers(role) if w.worker_id in workers]
        if not live:
            raise BackendUnavailable(f"no {role} worker is alive")
        least = [w.worker_id for w in live if w.load == live[0].load]
        return workers[least[next(self._round_robin) % len(least)]]

    def tokenize(self, text: str) -> list[int]:
        if self._tokenizer is not None:
            return self._tokenizer.encode(text)
        return ray.get(next(iter(self.prefill.values())).tokenize.remote(text))

    def model_summary(self) -> ModelSummary:
        return self._summary

    def is_serving(self) -> bool:
        return bool(self.registry.live_workers("prefill")) and bool(self.registry.live_workers("decode"))

    def stats(self) -> dict[str, int]:
        total: dict[str, int] = {"requests_in_flight": 0, "kv_blocks_used": 0, "kv_blocks_total": 0}
        for worker in self.registry.live_workers("decode"):
            for key in total:
                total[key] += int(worker.stats.get(key, 0))
        return total
