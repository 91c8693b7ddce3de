"""The prefill worker (a Ray actor, `clsa-prefill-<i>`): runs a request's prompt, publishes the
KV bundle by object handle, and moves its transfer record PENDING -> READY (or DONE when the first
token already finished the request).

One request at a time per worker (a plain actor: Ray queues the calls); scale with more workers.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import ray

from services.engine import EngineConfig, LLMEngine
from services.gateway.backend import ModelSummary
from services.gateway.convert import GenerationRequest
from services.transfer import LedgerError, TransferLedger, WorkerRegistry

HEARTBEAT_S = 1.0


class PrefillWorker:
    def __init__(self, worker_id: str, model: str, redis_url: str, prefix: str, device: str = "cpu",
                 max_num_seqs: int = 4) -> None:
        self.worker_id = worker_id
        self.engine = LLMEngine.from_model(model, EngineConfig(max_num_seqs=max_num_seqs), device=device)
        self.model = model
        self.ledger = TransferLedger.from_url(redis_url, prefix=prefix)
        self.registry = WorkerRegistry(self.ledger.client, prefix=prefix, ttl_s=5 * HEARTBEAT_S)
        self._in_flight = 0
        self._fault: str | None = None
        self._stop = threading.Event()
        self.registry.register(worker_id, "prefill", self.engine.fingerprint)
        threading.Thread(target=self._heartbeat, daemon=True).start()

    def prefill(self, request: GenerationRequest, transfer_id: str) -> dict[str, Any]:
        """Run the prompt of a request whose transfer record (PENDING) the gateway made. Returns
        the first token's output and, unless that finished the request, the bundle's handle (in a
        list, so Ray hands the handle on instead of the bundle). If the gateway gave the request
        up meanwhile (record FAILED), the bundle is dropped."""
        self._in_flight += 1
        started_at = time.time()
        try:
            try:
                first, bundle = self.engine.prefill_to_bundle(request.prompt, request.params, request.attention,
                                                              request.request_id or None)
            except Exception as e:
                self.ledger.fail(transfer_id, f"prefill: {type(e).__name__}: {e}")
                raise
            if self._fault == "crash_in_prefill":
                os._exit(1)  # the fault-injection suite: die with the prompt run and nothing published
            first.stage_ms["prefill"] = (time.time() - started_at) * 1e3
            result = {"first": first, "bundle": None, "started_at": started_at}
            if bundle is None:
                self.ledger.finish_at_prefill(transfer_id, len(first.token_ids))
                return result
            handle = ray.put(bundle)
            try:
                self.ledger.mark_ready(transfer_id, bundle.n_tokens, bundle.nbytes)
            except LedgerError:
                return result  # abandoned: nobody will claim it
            return {**result, "bundle": [handle]}
        finally:
            self._in_flight -= 1

    def inject_fault(self, kind: str | None) -> None:
        """For the fault-injection suite (tests/faults): "crash_in_prefill" makes the process exit
        in the middle of its next prefill, as a crash would; None clears it. Ray restarts the actor."""
        if kind not in (None, "crash_in_prefill"):
            raise ValueError(f"unknown fault {kind!r}")
        self._fault = kind

    def model_summary(self) -> ModelSummary:
        cfg = self.engine.model_config
        return ModelSummary(model=self.model, fingerprint=self.engine.fingerprint, arch=cfg.arch,
                            vocab_size=cfg.vocab_size, max_seq_len=cfg.max_seq_len, n_layers=cfg.n_layers,
                            index_topk=self.engine.index_topk, swa_window=cfg.swa_window)

    def tokenize(self, prompt: str) -> list[int]:
        return self.engine.tokenizer.encode(prompt)

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self.registry.heartbeat(self.worker_id, "prefill", self.engine.fingerprint, self._in_flight, {})
            except Exception:  # noqa: BLE001 -- Redis away for a moment: the next beat retries
                continue
