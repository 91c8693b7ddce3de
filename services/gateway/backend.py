"""Where the gateway sends requests: a small interface, and the in-process engine behind it.

`LocalEngineBackend` runs one LLMEngine in a thread of its own (its step loop is blocking torch
work) and hands each request's outputs to the asyncio task that streams them. The disaggregated
backend (Ray prefill and decode workers, transfers in Redis; issue #4) implements the same
interface.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Protocol

from services.engine import LLMEngine, RequestOutput
from services.engine.bundle import KVBundle
from services.engine.errors import NoRoomNowError
from services.gateway.convert import GenerationRequest

ROOM_POLL_S = 0.01  # how often a bundle waiting for KV room tries again


class BackendUnavailable(Exception):
    """No worker can take requests now."""


class AdmissionQueueFull(Exception):
    """More requests in flight than the backend admits."""


@dataclass(frozen=True)
class ModelSummary:
    model: str
    fingerprint: str
    arch: str
    vocab_size: int
    max_seq_len: int
    n_layers: int
    index_topk: int
    swa_window: int


class GenerationBackend(Protocol):
    def generate(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]: ...

    def tokenize(self, text: str) -> list[int]: ...

    def model_summary(self) -> ModelSummary: ...

    def is_serving(self) -> bool: ...

    def stats(self) -> dict[str, int]: ...


class LocalEngineBackend:
    """One in-process engine. Requests past `max_in_flight` are refused (AdmissionQueueFull)."""

    def __init__(self, engine: LLMEngine, model_name: str, max_in_flight: int = 256) -> None:
        self.engine = engine
        self.model_name = model_name
        self.max_in_flight = max_in_flight
        self._lock = threading.Lock()  # guards the engine: its loop thread and add/abort callers
        self._waiting = 0  # bundles waiting for KV room (counted against max_in_flight)
        self._wakeup = threading.Event()
        self._stopped = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue[RequestOutput | Exception]]] = {}
        self._thread = threading.Thread(target=self._loop, name="clsa-engine", daemon=True)
        self._thread.start()

    # ---- GenerationBackend -----------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        """Outputs of one request as the engine makes them; closing the iterator early (client
        cancel, deadline) aborts the request and frees its KV blocks."""
        request_id = request.request_id or uuid.uuid4().hex

        def add() -> None:
            self.engine.add_request(request.prompt, request.params, request.attention, request_id=request_id)

        async for out in self._stream(request_id, add):
            yield out

    async def continue_bundle(self, bundle: KVBundle, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        """Decode a request another engine prefilled (its first token is not repeated)."""
        request_id = request.request_id or uuid.uuid4().hex

        def add() -> None:
            self.engine.add_bundle(bundle, request.params, request.attention, request_id=request_id)

        async for out in self._stream(request_id, add):
            yield out

    async def _stream(self, request_id: str, add: Callable[[], None]) -> AsyncIterator[RequestOutput]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[RequestOutput | Exception] = asyncio.Queue()
        while True:
            with self._lock:
                if len(self._streams) + self._waiting >= self.max_in_flight:
                    raise AdmissionQueueFull(f"{len(self._streams) + self._waiting} requests in flight "
                                             f"(max {self.max_in_flight})")
                try:
                    add()
                except NoRoomNowError:
                    # A bundle to continue needs its blocks and a slot now: wait in line until
                    # running requests finish (cancelling the caller ends the wait).
                    self._waiting += 1
                else:
                    self._streams[request_id] = (loop, queue)
                    break
            try:
                await asyncio.sleep(ROOM_POLL_S)
            finally:
                with self._lock:
                    self._waiting -= 1
        self._wakeup.set()
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, Exception):
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self._abort(request_id)

    def tokenize(self, text: str) -> list[int]:
        return self.engine.tokenizer.encode(text)

    def model_summary(self) -> ModelSummary:
        cfg = self.engine.model_config
        return ModelSummary(model=self.model_name, fingerprint=self.engine.fingerprint, arch=cfg.arch,
                            vocab_size=cfg.vocab_size, max_seq_len=cfg.max_seq_len, n_layers=cfg.n_layers,
                            index_topk=self.engine.index_topk, swa_window=cfg.swa_window)

    def is_serving(self) -> bool:
        return self._thread.is_alive() and not self._stopped.is_set()

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"requests_in_flight": len(self._streams),
                    "requests_waiting": self._waiting,  # bundles in line for KV room
                    "kv_blocks_used": self.engine.cache.blocks.num_used,
                    "kv_blocks_total": self.engine.cache.num_blocks,
                    "kv_block_size": self.engine.config.block_size}

    def stop(self) -> None:
        self._stopped.set()
        self._wakeup.set()
        self._thread.join(timeout=10)

    # ---- the engine thread -----------------------------------------------------------------

    def _abort(self, request_id: str) -> None:
        with self._lock:
            self._streams.pop(request_id, None)
            self.engine.abort_request(request_id)

    def _loop(self) -> None:
        while not self._stopped.is_set():
            with self._lock:
                busy = self.engine.has_unfinished_requests()
                if busy:
                    try:
                        outputs = self.engine.step()
                    except Exception as e:  # noqa: BLE001 -- fail the requests in flight, keep serving
                        self._fail_all(e)
                        continue
            if not busy:
                self._wakeup.wait(timeout=0.5)
                self._wakeup.clear()
                continue
            for out in outputs:
                with self._lock:
                    target = self._streams.get(out.request_id)
                    if out.finished:
                        self._streams.pop(out.request_id, None)
                if target is not None:
                    loop, queue = target
                    loop.call_soon_threadsafe(queue.put_nowait, out)

    def _fail_all(self, error: Exception) -> None:
        for request_id, (loop, queue) in list(self._streams.items()):
            self.engine.abort_request(request_id)
            loop.call_soon_threadsafe(queue.put_nowait, error)
        self._streams.clear()
