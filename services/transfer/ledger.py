"""The transfer ledger: one Redis hash per KV transfer from a prefill worker to a decode worker.

State machine (what Redis stores in the `state` field)::

    PENDING --ready--> READY --claim--> CLAIMED --complete--> DONE
       |                 |                 |
       +--finish_at_prefill (the first token ended the request: nothing to move)--> DONE
       +-----fail------> FAILED <---fail---+          (fail from any non-terminal state)
       +---reap (deadline passed)--> EXPIRED <--------+

- The gateway creates the record (PENDING) before it asks a prefill worker, so that it can fail a
  request it abandons (client gone, deadline) even before the worker starts; the worker's
  `mark_ready` then fails and it drops the bundle.

- PENDING: the producer (prefill worker) has started; READY: the bundle is published by handle;
  CLAIMED: one consumer (decode worker) owns it under a lease it must renew; DONE, FAILED, EXPIRED
  are terminal. Every transition is one Lua script (atomic); an invalid one is refused with
  `InvalidTransition` and changes nothing, so of many concurrent claims exactly one wins.
- Every non-terminal record has a `deadline_ms` (PENDING/READY: `ready_timeout_ms` after the last
  transition; CLAIMED: the lease) indexed in the sorted set `<prefix>xfer:deadlines`. The reaper
  expires records past their deadline and hands each one to a release callback (free the handle)
  exactly once, even when several reapers run at once.
- Terminal records stay readable for `keep_terminal_s`, then Redis deletes them.
"""

from __future__ import annotations

import enum
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import redis

DEFAULT_PREFIX = "clsa:"
REDIS_TIMEOUT_S = 5.0  # socket timeouts of the clients from_url makes


class TransferState(enum.Enum):
    PENDING = "PENDING"
    READY = "READY"
    CLAIMED = "CLAIMED"
    DONE = "DONE"
    FAILED = "FAILED"
    EXPIRED = "EXPIRED"


NON_TERMINAL = (TransferState.PENDING, TransferState.READY, TransferState.CLAIMED)


class LedgerError(Exception):
    """Base class of the ledger's errors."""


class InvalidTransition(LedgerError):
    """The record is not in a state the transition starts from (or not owned by the caller)."""


class UnknownTransfer(LedgerError):
    """No record with this id (never created, or deleted after `keep_terminal_s`)."""


@dataclass(frozen=True)
class TransferRecord:
    transfer_id: str
    state: TransferState
    request_id: str
    producer: str
    consumer: str
    n_tokens: int
    nbytes: int
    fingerprint: str
    created_ms: int
    updated_ms: int
    deadline_ms: int
    error: str
    ready_ms: int = 0  # when the bundle was published
    done_ms: int = 0  # when the consumer held the KV

    @property
    def transfer_ms(self) -> int:
        """Published to held by the decode worker (0 until DONE)."""
        return self.done_ms - self.ready_ms if self.done_ms and self.ready_ms else 0

    @classmethod
    def from_hash(cls, transfer_id: str, h: dict[str, str]) -> TransferRecord:
        return cls(
            transfer_id=transfer_id, state=TransferState(h["state"]), request_id=h.get("request_id", ""),
            producer=h.get("producer", ""), consumer=h.get("consumer", ""), n_tokens=int(h.get("n_tokens", 0)),
            nbytes=int(h.get("nbytes", 0)), fingerprint=h.get("fingerprint", ""),
            created_ms=int(h.get("created_ms", 0)), updated_ms=int(h.get("updated_ms", 0)),
            deadline_ms=int(h.get("deadline_ms", 0)), error=h.get("error", ""),
            ready_ms=int(h.get("ready_ms", 0)), done_ms=int(h.get("done_ms", 0)),
        )


# KEYS[1] record hash, KEYS[2] deadline index. ARGV: id, allowed states ("A,B"), new state, now_ms,
# deadline_ms (0: terminal, leave the index), keep_ms (terminal TTL), required consumer ("" = any),
# then field/value pairs to set. Returns the previous state, or an error.
_TRANSITION = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return redis.error_reply('UNKNOWN') end
local allowed = false
for s in string.gmatch(ARGV[2], '[^,]+') do
  if s == state then allowed = true end
end
if not allowed then return redis.error_reply('STATE ' .. state) end
if ARGV[7] ~= '' and redis.call('HGET', KEYS[1], 'consumer') ~= ARGV[7] then
  return redis.error_reply('OWNER ' .. (redis.call('HGET', KEYS[1], 'consumer') or ''))
end
redis.call('HSET', KEYS[1], 'state', ARGV[3], 'updated_ms', ARGV[4], 'deadline_ms', ARGV[5])
for i = 8, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
if ARGV[5] == '0' then
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('PEXPIRE', KEYS[1], ARGV[6])
else
  redis.call('ZADD', KEYS[2], ARGV[5], ARGV[1])
end
return state
"""

# KEYS[1] record, KEYS[2] index. ARGV: id, now_ms, keep_ms. Expires the record if it is still
# non-terminal and past its deadline; returns 1 when this call expired it, else 0.
_EXPIRE = """
local state = redis.call('HGET', KEYS[1], 'state')
redis.call('ZREM', KEYS[2], ARGV[1])
if not state then return 0 end
if state ~= 'PENDING' and state ~= 'READY' and state ~= 'CLAIMED' then return 0 end
if tonumber(redis.call('HGET', KEYS[1], 'deadline_ms')) > tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[2], redis.call('HGET', KEYS[1], 'deadline_ms'), ARGV[1])
  return 0
end
redis.call('HSET', KEYS[1], 'state', 'EXPIRED', 'updated_ms', ARGV[2], 'deadline_ms', 0,
           'error', 'expired in ' .. state)
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""


# KEYS[1] record, KEYS[2] index. ARGV: id, deadline_ms, then field/value pairs. 1 if created.
_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
for i = 3, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
return 1
"""


def now_ms() -> int:
    return int(time.time() * 1000)


def text(value: object) -> str:
    """A Redis reply as str, whether the client decodes responses or not."""
    return value.decode() if isinstance(value, bytes) else str(value)


def text_hash(h: dict) -> dict[str, str]:
    return {text(k): text(v) for k, v in h.items()}


class TransferLedger:
    """Transfers of one deployment, under `prefix` in one Redis."""

    def __init__(self, client: redis.Redis, prefix: str = DEFAULT_PREFIX, ready_timeout_ms: int = 30_000,
                 lease_ms: int = 10_000, keep_terminal_s: int = 3600) -> None:
        if ready_timeout_ms < 1 or lease_ms < 1 or keep_terminal_s < 1:
            raise ValueError("ready_timeout_ms, lease_ms and keep_terminal_s must be >= 1")
        self.client = client
        self.prefix = prefix
        self.ready_timeout_ms = ready_timeout_ms
        self.lease_ms = lease_ms
        self.keep_ms = keep_terminal_s * 1000
        self._index = f"{prefix}xfer:deadlines"
        self._create = client.register_script(_CREATE)
        self._transition = client.register_script(_TRANSITION)
        self._expire = client.register_script(_EXPIRE)

    @classmethod
    def from_url(cls, url: str, **kwargs: object) -> TransferLedger:
        """A client that fails within seconds when Redis is away (no call hangs on a dead server)."""
        client = redis.Redis.from_url(url, decode_responses=True, socket_timeout=REDIS_TIMEOUT_S,
                                      socket_connect_timeout=REDIS_TIMEOUT_S)
        return cls(client, **kwargs)  # type: ignore[arg-type]

    def key(self, transfer_id: str) -> str:
        return f"{self.prefix}xfer:{transfer_id}"

    # ---- transitions -----------------------------------------------------------------------

    def create(self, request_id: str, producer: str, fingerprint: str, transfer_id: str | None = None) -> str:
        """A new PENDING record; returns its id."""
        transfer_id = transfer_id or uuid.uuid4().hex
        t = now_ms()
        deadline = t + self.ready_timeout_ms
        fields: dict[str, str | int] = {
            "state": TransferState.PENDING.value, "request_id": request_id, "producer": producer,
            "consumer": "", "n_tokens": 0, "nbytes": 0, "fingerprint": fingerprint, "created_ms": t,
            "updated_ms": t, "deadline_ms": deadline, "error": "",
        }
        args: list[str | int] = [transfer_id, deadline]
        for name, value in fields.items():
            args += [name, value]
        if not self._create(keys=[self.key(transfer_id), self._index], args=args):
            raise LedgerError(f"transfer {transfer_id} already exists")
        return transfer_id

    def mark_ready(self, transfer_id: str, n_tokens: int, nbytes: int) -> None:
        """PENDING -> READY: the bundle is published."""
        t = now_ms()
        self._move(transfer_id, (TransferState.PENDING,), TransferState.READY, t + self.ready_timeout_ms,
                   n_tokens=n_tokens, nbytes=nbytes, ready_ms=t)

    def finish_at_prefill(self, transfer_id: str, n_tokens: int) -> None:
        """PENDING -> DONE: the first token finished the request, no KV needs to move."""
        self._move(transfer_id, (TransferState.PENDING,), TransferState.DONE, 0, n_tokens=n_tokens)

    def claim(self, transfer_id: str, consumer: str) -> TransferRecord:
        """READY -> CLAIMED by `consumer`, under a lease of `lease_ms`. Exactly one of concurrent
        claimers wins; the others get InvalidTransition."""
        self._move(transfer_id, (TransferState.READY,), TransferState.CLAIMED, now_ms() + self.lease_ms,
                   consumer=consumer)
        return self.get(transfer_id)

    def renew_lease(self, transfer_id: str, consumer: str) -> None:
        """Extend the claim's lease; only its consumer may."""
        self._move(transfer_id, (TransferState.CLAIMED,), TransferState.CLAIMED, now_ms() + self.lease_ms,
                   owner=consumer)

    def complete(self, transfer_id: str, consumer: str) -> None:
        """CLAIMED -> DONE: the consumer holds the KV; the handle may be released."""
        self._move(transfer_id, (TransferState.CLAIMED,), TransferState.DONE, 0, owner=consumer, done_ms=now_ms())

    def fail(self, transfer_id: str, error: str) -> None:
        """Any non-terminal state -> FAILED, with the reason."""
        self._move(transfer_id, NON_TERMINAL, TransferState.FAILED, 0, error=error)

    def _move(self, transfer_id: str, allowed: Iterable[TransferState], to: TransferState, deadline_ms: int,
              owner: str = "", **fields: str | int) -> None:
        allowed_csv = ",".join(s.value for s in allowed)
        args: list[str | int] = [transfer_id, allowed_csv, to.value, now_ms(), deadline_ms, self.keep_ms, owner]
        for name, value in fields.items():
            args += [name, value]
        try:
            self._transition(keys=[self.key(transfer_id), self._index], args=args)
        except redis.ResponseError as e:
            message = str(e)
            if message.startswith("UNKNOWN"):
                raise UnknownTransfer(f"transfer {transfer_id}: no such record") from None
            if message.startswith("OWNER"):
                raise InvalidTransition(
                    f"transfer {transfer_id}: claimed by {message[6:]!r}, not {owner!r}") from None
            state = message.removeprefix("STATE ")
            raise InvalidTransition(
                f"transfer {transfer_id}: {state} -> {to.value} is not allowed (from {allowed_csv})") from None

    # ---- reading ---------------------------------------------------------------------------

    def get(self, transfer_id: str) -> TransferRecord:
        h = self.client.hgetall(self.key(transfer_id))
        if not h:
            raise UnknownTransfer(f"transfer {transfer_id}: no such record")
        return TransferRecord.from_hash(transfer_id, text_hash(h))

    def records(self, states: Iterable[TransferState] | None = None) -> list[TransferRecord]:
        """Every record under the prefix (optionally of some states), oldest first."""
        wanted = set(states) if states is not None else None
        out = []
        for raw_key in self.client.scan_iter(match=f"{self.prefix}xfer:*", count=500):
            key = text(raw_key)
            if key == self._index:
                continue
            h = self.client.hgetall(key)
            if h:
                record = TransferRecord.from_hash(key.removeprefix(f"{self.prefix}xfer:"), text_hash(h))
                if wanted is None or record.state in wanted:
                    out.append(record)
        return sorted(out, key=lambda r: r.created_ms)

    # ---- the reaper ------------------------------------------------------------------------

    def reap(self, release: Callable[[TransferRecord], None] | None = None, now: int | None = None) -> list[str]:
        """Expire every non-terminal record past its deadline; `release` is called once per record
        this call expired (free its handle). Idempotent; safe with several reapers at once."""
        t = now if now is not None else now_ms()
        expired = []
        for member in self.client.zrangebyscore(self._index, "-inf", t):
            transfer_id = text(member)
            if self._expire(keys=[self.key(transfer_id), self._index], args=[transfer_id, t, self.keep_ms]):
                expired.append(transfer_id)
                if release is not None:
                    release(self.get(transfer_id))
        return expired
