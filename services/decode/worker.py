"""The decode worker (an async Ray actor, `clsa-decode-<i>`): claims a transfer (READY ->
CLAIMED), pulls the bundle into its paged cache, acknowledges it (-> DONE), and streams tokens
from its continuous-batching loop as a Ray streaming generator. A cancelled stream aborts the
request and frees its KV blocks."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator
from typing import Any

from services.engine import EngineConfig, LLMEngine, RequestOutput
from services.gateway.backend import LocalEngineBackend
from services.gateway.convert import GenerationRequest
from services.transfer import TransferLedger, WorkerRegistry

HEARTBEAT_S = 1.0


class DecodeWorker:
    def __init__(self, worker_id: str, model: str, redis_url: str, prefix: str, device: str = "cpu",
                 max_num_seqs: int = 16, max_in_flight: int = 256, num_blocks: int | None = None) -> None:
        self.worker_id = worker_id
        engine = LLMEngine.from_model(model, EngineConfig(max_num_seqs=max_num_seqs, num_blocks=num_blocks),
                                      device=device)
        self.backend = LocalEngineBackend(engine, model, max_in_flight=max_in_flight)
        self.ledger = TransferLedger.from_url(redis_url, prefix=prefix)
        self.registry = WorkerRegistry(self.ledger.client, prefix=prefix, ttl_s=5 * HEARTBEAT_S)
        self.registry.register(worker_id, "decode", engine.fingerprint)
        self._fault: tuple[str, int] | None = None
        self._stop = threading.Event()
        threading.Thread(target=self._heartbeat, daemon=True).start()

    def inject_fault(self, kind: str | None, after_outputs: int = 0) -> None:
        """For the fault-injection suite (tests/faults): the process exits, as a crash would, during
        its next request - "crash_in_transfer" once it has claimed the transfer and before the
        bundle is in, "crash_mid_stream" after streaming `after_outputs` outputs. None clears it."""
        if kind not in (None, "crash_in_transfer", "crash_mid_stream"):
            raise ValueError(f"unknown fault {kind!r}")
        self._fault = None if kind is None else (kind, after_outputs)

    async def generate(self, request: GenerationRequest, transfer_id: str,
                       bundle_box: list[Any]) -> AsyncIterator[RequestOutput]:
        self.ledger.claim(transfer_id, self.worker_id)
        if self._fault is not None and self._fault[0] == "crash_in_transfer":
            os._exit(1)
        renewing = asyncio.create_task(self._renew(transfer_id))
        try:
            bundle = await bundle_box[0]
            if bundle.fingerprint != self.backend.engine.fingerprint:
                raise ValueError(f"bundle of model {bundle.fingerprint}, this worker serves "
                                 f"{self.backend.engine.fingerprint}")
        except BaseException as e:
            renewing.cancel()
            self.ledger.fail(transfer_id, f"decode: {type(e).__name__}: {e}")
            raise
        done = False
        streamed = 0
        try:
            async for out in self.backend.continue_bundle(bundle, request):
                if self._fault is not None and self._fault[0] == "crash_mid_stream" and streamed >= self._fault[1]:
                    os._exit(1)
                streamed += 1
                if not done:  # the KV is in this worker's cache now: the transfer is done
                    renewing.cancel()
                    self.ledger.complete(transfer_id, self.worker_id)
                    done = True
                yield out
        except BaseException as e:
            renewing.cancel()
            if not done:
                self.ledger.fail(transfer_id, f"decode: {type(e).__name__}: {e}")
            raise

    async def _renew(self, transfer_id: str) -> None:
        """Keep the claim's lease while the bundle is pulled and imported."""
        while True:
            await asyncio.sleep(self.ledger.lease_ms / 3000)
            self.ledger.renew_lease(transfer_id, self.worker_id)

    def stats(self) -> dict[str, int]:
        return self.backend.stats()

    def fingerprint(self) -> str:
        return self.backend.engine.fingerprint

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                stats = self.backend.stats()
                self.registry.heartbeat(self.worker_id, "decode", self.backend.engine.fingerprint,
                                        stats["requests_in_flight"], stats)
            except Exception:  # noqa: BLE001 -- Redis away for a moment: the next beat retries
                continue
