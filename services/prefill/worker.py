"""The prefill worker (a Ray actor, `clsa-prefill-<i>`): runs a request's prompt, publishes the
KV bundle by object handle, and records the transfer in the ledger (PENDING -> READY).

One request at a time per worker (a plain actor: Ray queues the calls); scale with more workers.
"""

from __future__ import annotations

import threading
from typing import Any

import ray

from services.engine import EngineConfig, LLMEngine
from services.gateway.backend import ModelSummary
from services.gateway.convert import GenerationRequest
from services.transfer import TransferLedger, WorkerRegistry

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
        self._stop = threading.Event()
        self.registry.register(worker_id, "prefill", self.engine.fingerprint)
        threading.Thread(target=self._heartbeat, daemon=True).start()

    def prefill(self, request: GenerationRequest) -> dict[str, Any]:
        """The first token's output, and - unless it finished the request - the transfer id and the
        bundle's handle (inside a list, so Ray hands the handle on instead of the bundle)."""
        self._in_flight += 1
        try:
            first, bundle = self.engine.prefill_to_bundle(request.prompt, request.params, request.attention,
                                                          request.request_id or None)
            if bundle is None:
                return {"first": first, "transfer_id": None, "bundle": None}
            transfer_id = self.ledger.create(first.request_id, self.worker_id, self.engine.fingerprint)
            try:
                handle = ray.put(bundle)
                self.ledger.mark_ready(transfer_id, bundle.n_tokens, bundle.nbytes)
            except Exception as e:
                self.ledger.fail(transfer_id, f"prefill: publishing the bundle failed: {e}")
                raise
            return {"first": first, "transfer_id": transfer_id, "bundle": [handle]}
        finally:
            self._in_flight -= 1

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
