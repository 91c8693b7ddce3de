"""The disaggregated backend: Ray prefill and decode workers, transfers tracked in Redis.

    gateway --prefill.remote--> clsa-prefill-<i>   (first token, bundle handle, ledger READY)
            --generate.remote-> clsa-decode-<j>    (claims, pulls, DONE; streams tokens back)

Workers are picked least-loaded first from the registry's heartbeats. A stream the client drops is
cancelled on the decode worker, which aborts the request and frees its KV.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import ray
import redis

from services.decode.worker import DecodeWorker
from services.engine import OutOfBlocksError, RequestOutput
from services.engine.tokenizer import Tokenizer
from services.gateway.backend import AdmissionQueueFull, BackendUnavailable, ModelSummary
from services.gateway.convert import GenerationRequest, prompt_tokens
from services.prefill.worker import PrefillWorker
from services.transfer import LedgerError, TransferLedger, TransferRecord, WorkerInfo, WorkerRegistry
from services.transfer.registry import Role

NAMESPACE = "clsa"
# A request whose decode worker is lost continues on another one from its bundle, at most this many
# times (two decode workers dying together: the second resume finds the first restarted).
MAX_RESUMES = 2
RESUME_WAIT_S = 30.0  # how long a resume waits for a decode worker to be back


def start_prefill_worker(i: int, model: str, redis_url: str, prefix: str, device: str = "cpu",
                         max_restarts: int = 2, namespace: str = NAMESPACE) -> Any:
    """The named actor `clsa-prefill-<i>` (namespace `clsa`); Ray restarts it up to `max_restarts`."""
    cls: Any = ray.remote(num_cpus=0, num_gpus=1 if device == "cuda" else 0, max_restarts=max_restarts)(PrefillWorker)
    return cls.options(name=f"clsa-prefill-{i}", namespace=namespace).remote(
        f"clsa-prefill-{i}", model, redis_url, prefix, device)


def start_decode_worker(i: int, model: str, redis_url: str, prefix: str, device: str = "cpu",
                        max_restarts: int = 2, namespace: str = NAMESPACE, num_blocks: int | None = None) -> Any:
    """The named async actor `clsa-decode-<i>` (Ray runs up to 1,000 of its calls at once);
    `num_blocks` KV blocks in its pool (None: sized by the engine's default byte budget)."""
    cls: Any = ray.remote(num_cpus=0, num_gpus=1 if device == "cuda" else 0, max_restarts=max_restarts)(DecodeWorker)
    return cls.options(name=f"clsa-decode-{i}", namespace=namespace).remote(
        f"clsa-decode-{i}", model, redis_url, prefix, device, num_blocks=num_blocks)


def start_workers(model: str, redis_url: str, prefix: str, n_prefill: int, n_decode: int,
                  device: str = "cpu", max_restarts: int = 2, namespace: str = NAMESPACE,
                  decode_num_blocks: int | None = None) -> tuple[list[Any], list[Any]]:
    """`n_prefill` + `n_decode` workers (ray.init first); refuses workers that disagree on the model.
    A crashed worker is restarted by Ray (up to `max_restarts` times) and registers again; calls in
    flight on it fail, and the backend retries a prefill once elsewhere. A second deployment in the
    same Ray takes its own `namespace` (worker names are unique per namespace)."""
    prefill = [start_prefill_worker(i, model, redis_url, prefix, device, max_restarts, namespace)
               for i in range(n_prefill)]
    decode = [start_decode_worker(i, model, redis_url, prefix, device, max_restarts, namespace, decode_num_blocks)
              for i in range(n_decode)]
    summaries = ray.get([w.model_summary.remote() for w in prefill])
    fingerprints = {s.fingerprint for s in summaries} | set(ray.get([w.fingerprint.remote() for w in decode]))
    if len(fingerprints) != 1:
        raise RuntimeError(f"workers disagree on the model: fingerprints {sorted(fingerprints)}")
    return prefill, decode


def _worker_lost(e: BaseException) -> bool:
    """A worker process died or restarted, or the bundle went with its owner (as raised here, or
    raised in a worker and handed on by Ray as the cause of a RayTaskError)."""
    lost = (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError)
    return isinstance(e, lost) or isinstance(getattr(e, "cause", None), lost)


def _reason(e: BaseException) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {first[:200]}" if first else type(e).__name__


class _Rejoin:
    """A resumed decode stream joined to what the client already has: the new worker makes again,
    from the bundle on, the tokens and text already streamed (`sent_ids`, `sent_text`; the bundle's
    own - the prefill's first output - are the first `ids_at` and `chars_at`). Those are checked
    delta by delta and dropped, the rest passed on. The decode is deterministic (greedy, or seeded
    by the bundle's sampler state), but another worker batches differently; should its tokens or
    text differ from those already streamed, the request ends (never a stream that contradicts
    itself)."""

    def __init__(self, sent_ids: list[int], sent_text: str, ids_at: int, chars_at: int, lost: str,
                 now_on: str) -> None:
        self.sent_ids, self.sent_text = sent_ids, sent_text
        self.ids_at, self.chars_at = ids_at, chars_at
        self.lost, self.now_on = lost, now_on

    def __call__(self, out: RequestOutput) -> RequestOutput | None:
        """`out` with only what the client has not had; None while it has nothing new."""
        ids, text = out.new_token_ids, out.text_delta
        again = self.sent_ids[self.ids_at:self.ids_at + len(ids)]
        if ids[:len(again)] != again:
            at = self.ids_at + next(i for i, (a, b) in enumerate(zip(ids, again)) if a != b)
            raise self._contradicts(f"whose tokens differ from those already streamed at token {at}")
        said = self.sent_text[self.chars_at:self.chars_at + len(text)]
        if text[:len(said)] != said:
            raise self._contradicts("whose text differs from the text already streamed")
        self.ids_at += len(ids)
        self.chars_at += len(text)
        if out.finished and self.ids_at < len(self.sent_ids):
            raise self._contradicts(f"whose tokens differ from those already streamed at token {self.ids_at}")
        if out.finished and self.chars_at < len(self.sent_text):
            raise self._contradicts("whose text differs from the text already streamed")
        fresh_ids, fresh_text = ids[len(again):], text[len(said):]
        if not fresh_ids and not fresh_text and not out.finished:
            return None
        return replace(out, new_token_ids=fresh_ids, text_delta=fresh_text)

    def _contradicts(self, how: str) -> BackendUnavailable:
        return BackendUnavailable(f"decode worker {self.lost} was lost; resumed on {self.now_on}, {how}: "
                                  "the request ended")


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
        self._turns = {"prefill": itertools.count(), "decode": itertools.count()}  # ties take turns, per role
        self._tokenizer = tokenizer
        self.retries = 0  # prefills tried again on another worker
        self.resumes = 0  # requests continued on another decode worker after theirs was lost
        self._lost: dict[str, int] = {}  # worker id -> when a call found it dead (ms)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        if self._in_flight >= self.max_in_flight:
            raise AdmissionQueueFull(f"{self._in_flight} requests in flight (max {self.max_in_flight})")
        self._in_flight += 1
        try:
            async for out in self._generate(replace(request, request_id=request.request_id or uuid.uuid4().hex)):
                yield out
        except redis.RedisError as e:
            raise BackendUnavailable(f"the transfer ledger (Redis) is unreachable: {_reason(e)}") from e
        finally:
            self._in_flight -= 1

    async def _generate(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        live = self._live("decode")  # one registry read for both
        consumer = self._pick("decode", self.decode, live=live)  # none alive: UNAVAILABLE before any prefill
        self._check_fits(request, live)
        transfer_id, result = await self._prefill(request)
        stream, finished = None, False
        try:
            first = result["first"]
            finished = first.finished
            yield first
            if result["bundle"] is None:
                return
            bundle = result["bundle"]
            self._handles[transfer_id] = bundle
            del result
            # What the client has: a resumed stream is checked against it (only then is the text joined).
            sent_ids, sent_text = list(first.new_token_ids), [first.text_delta]
            rejoin: _Rejoin | None = None
            lost: list[str] = []  # decode workers whose process died under this request
            broken: str | None = None  # the worker whose stream broke last (None: none has)
            broke_at = 0.0
            while True:
                stream = consumer.generate.remote(request, transfer_id, bundle)
                try:
                    async for ref in stream:
                        out = await ref
                        if rejoin is not None:  # resumed: the tokens the client already has are made again
                            out = rejoin(out)
                            if out is None:
                                continue
                        finished = out.finished
                        if finished:
                            out.stage_ms["transfer"] = float(self.ledger.get(transfer_id).transfer_ms)
                        sent_ids += out.new_token_ids
                        sent_text.append(out.text_delta)
                        yield out
                    return
                except Exception as e:
                    if not _worker_lost(e):
                        if isinstance(e, LedgerError) or isinstance(getattr(e, "cause", None), LedgerError):
                            raise BackendUnavailable(f"the transfer ledger lost this request's record "
                                                     f"({_reason(e)}; Redis restarted?)") from e
                        raise
                    broken = self._name(consumer, self.decode)
                    self._lost[broken] = int(time.time() * 1000)
                    broke_at = broke_at or time.monotonic()
                    if isinstance(e, ray.exceptions.ActorUnavailableError):
                        await asyncio.sleep(0.25)  # Ray is restarting it, or has just: not a loss of its own
                    else:
                        lost.append(broken)
                    if len(lost) > MAX_RESUMES or time.monotonic() - broke_at > RESUME_WAIT_S:
                        raise BackendUnavailable(
                            f"decode worker {broken} was lost ({_reason(e)}); {len(lost)} decode workers lost and "
                            f"{time.monotonic() - broke_at:.0f} s of resuming this request: it ended") from e
                    # Resume from the same bundle, which the prefill worker still holds, on another
                    # decode worker or on one restarted by Ray: a new transfer record, READY at once.
                    consumer = await self._resume_target([*lost, broken], broke_at + RESUME_WAIT_S)
                    rejoin = _Rejoin(list(sent_ids), "".join(sent_text), len(first.new_token_ids),
                                     len(first.text_delta), broken, self._name(consumer, self.decode))
                    transfer_id = self._transfer_again(request, transfer_id, bundle, broken, e)
                    self.resumes += 1
        finally:
            self._handles.pop(transfer_id, None)
            if not finished:
                # Ended early (cancel, deadline, a lost worker): stop the decode side and settle the
                # record now, not when the reaper finds it.
                if stream is not None:
                    ray.cancel(stream)
                self._settle(transfer_id, "gateway: the request ended before it finished")

    async def _prefill(self, request: GenerationRequest) -> tuple[str, dict[str, Any]]:
        """Prefill on the least-loaded prefill worker; if that worker dies meanwhile, once more on
        another (the same one, restarted, when it is the only one) before the client hears of it.
        Returns the transfer id and the worker's result; every failed attempt's record is settled."""
        tried: list[str] = []
        while True:
            producer = self._pick("prefill", self.prefill, avoid=tried)
            name = self._name(producer, self.prefill)
            transfer_id = self.ledger.create(request.request_id, name, self._summary.fingerprint)
            submitted = time.time()
            try:
                result = await producer.prefill.remote(request, transfer_id)
            except BaseException as e:
                self._settle(transfer_id, f"gateway: prefill on {name} ended: {_reason(e)}")
                if not (isinstance(e, Exception) and _worker_lost(e)):
                    raise
                tried.append(name)
                self._lost[name] = int(time.time() * 1000)
                self.retries += 1
                if len(tried) == 2:
                    raise BackendUnavailable(f"prefill failed twice, on {' and '.join(tried)}: the worker was lost "
                                             f"({_reason(e)})") from e
                continue
            result["first"].stage_ms["queue"] = max(0.0, (result["started_at"] - submitted) * 1e3)
            return transfer_id, result

    def _check_fits(self, request: GenerationRequest, live_decode: list[WorkerInfo]) -> None:
        """Refuse at once, before any prefill work (OutOfBlocksError: RESOURCE_EXHAUSTED), a request
        that no live decode worker's KV pool could ever hold; one that fits a pool later waits there
        in line for room."""
        pools = [(int(w.stats["kv_blocks_total"]), int(w.stats["kv_block_size"]))
                 for w in live_decode if w.worker_id in self.decode and "kv_block_size" in w.stats]
        if not pools:  # no heartbeat with the sizes yet: the decode worker itself refuses it
            return
        n_prompt = prompt_tokens(request, lambda text: len(self.tokenize(text)))
        tokens = min(n_prompt + request.params.max_tokens, self._summary.max_seq_len)
        if all(-(-tokens // size) > total for total, size in pools):
            raise OutOfBlocksError(
                f"request {request.request_id} needs KV room for {tokens} tokens ({n_prompt} prompt + up to "
                f"{tokens - n_prompt} new); the largest decode worker's pool holds "
                f"{max(total * size for total, size in pools)}")

    def _settle(self, transfer_id: str, error: str) -> None:
        """FAILED, unless a worker already settled it (refused, which is fine) or Redis is away (the
        record then ends with its deadline, or with Redis)."""
        try:
            self.ledger.fail(transfer_id, error)
        except (LedgerError, redis.RedisError):
            pass

    @property
    def handles_in_flight(self) -> int:
        return len(self._handles)

    def release(self, record: TransferRecord) -> None:
        """The reaper's callback: drop the gateway's handle of an expired transfer's bundle (Ray frees
        the object once no one holds it)."""
        self._handles.pop(record.transfer_id, None)

    @staticmethod
    def _name(worker: Any, workers: dict[str, Any]) -> str:
        return next(name for name, w in workers.items() if w is worker)

    def _pick(self, role: Role, workers: dict[str, Any], avoid: list[str] | None = None,
              fallback: bool = True, live: list[WorkerInfo] | None = None) -> Any:
        """The least-loaded live worker (by its last heartbeat) that is not one of `avoid`; ties
        take turns. A worker lost in a call stays out until it has registered again (Ray restarted
        it); with none but `avoid` left, one of those that has; failing that, when `fallback`, the
        last of `avoid` (a call to it fails or waits while Ray restarts it). `live`: the registry's
        workers of `role`, when the caller has just read them."""
        mine = [w for w in (self._live(role) if live is None else live) if w.worker_id in workers]
        fresh = [w for w in mine if w.heartbeat_ms > self._lost.get(w.worker_id, -1)]
        pick = [w for w in fresh if w.worker_id not in (avoid or [])] or fresh
        if not pick:
            if avoid and fallback:
                return workers[avoid[-1]]
            raise BackendUnavailable(f"no {role} worker is alive")
        least = [w.worker_id for w in pick if w.load == pick[0].load]
        return workers[least[next(self._turns[role]) % len(least)]]

    async def _resume_target(self, broken: list[str], deadline: float) -> Any:
        """A decode worker to resume on: a live one not in `broken` (the workers this request's
        streams broke on), else one of those once Ray has restarted it and it has registered
        again; waits until `deadline` (time.monotonic) at most."""
        while True:
            try:
                return self._pick("decode", self.decode, avoid=broken, fallback=False)
            except BackendUnavailable as e:
                if time.monotonic() > deadline:
                    raise BackendUnavailable(f"decode worker {broken[-1]} was lost and none came back within "
                                             f"{RESUME_WAIT_S:g} s to resume on ({e}); the request ended") from e
                await asyncio.sleep(0.2)

    def _transfer_again(self, request: GenerationRequest, transfer_id: str, bundle: list[Any], broken: str,
                        error: Exception) -> str:
        """Settle the transfer whose decode worker was lost (FAILED, unless it got to DONE) and
        publish the same bundle in a new record (READY); returns its id."""
        self._settle(transfer_id, f"gateway: decode worker {broken} was lost; resumed elsewhere")
        self._handles.pop(transfer_id, None)
        try:
            old = self.ledger.get(transfer_id)
            again = self.ledger.create(request.request_id, old.producer, old.fingerprint)
            self.ledger.mark_ready(again, old.n_tokens, old.nbytes)
        except LedgerError as e:
            raise BackendUnavailable(f"decode worker {broken} was lost ({_reason(error)}) and the request could "
                                     f"not be resumed ({_reason(e)})") from error
        self._handles[again] = bundle
        return again

    def _live(self, role: Role) -> list[WorkerInfo]:
        try:
            return self.registry.live_workers(role)
        except redis.RedisError as e:
            raise BackendUnavailable(f"the worker registry (Redis) is unreachable: {_reason(e)}") from e

    def tokenize(self, text: str) -> list[int]:
        if self._tokenizer is not None:
            return self._tokenizer.encode(text)
        return ray.get(next(iter(self.prefill.values())).tokenize.remote(text))

    def model_summary(self) -> ModelSummary:
        return self._summary

    def is_serving(self) -> bool:
        try:
            return bool(self.registry.live_workers("prefill")) and bool(self.registry.live_workers("decode"))
        except redis.RedisError:
            return False

    def stats(self) -> dict[str, int]:
        total: dict[str, int] = {"requests_in_flight": 0, "kv_blocks_used": 0, "kv_blocks_total": 0}
        try:
            decode = self.registry.live_workers("decode")
        except redis.RedisError:
            return total
        for worker in decode:
            for key in total:
                total[key] += int(worker.stats.get(key, 0))
        return total
