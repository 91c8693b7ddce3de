"""Worker registry: `<prefix>worker:<id>` hashes that live as long as their worker heartbeats.

A worker `register`s once and then calls `heartbeat` more often than `ttl_s`; a worker that stops
(crash, kill, lost node) disappears from `live_workers` when its key's TTL runs out.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Literal

import redis

from services.transfer.ledger import DEFAULT_PREFIX, text, text_hash

Role = Literal["prefill", "decode"]


@dataclass(frozen=True)
class WorkerInfo:
    worker_id: str
    role: Role
    fingerprint: str
    load: int  # requests in flight
    stats: dict[str, int]
    heartbeat_ms: int


class WorkerRegistry:
    def __init__(self, client: redis.Redis, prefix: str = DEFAULT_PREFIX, ttl_s: float = 5.0) -> None:
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
        self.client = client
        self.prefix = prefix
        self.ttl_ms = int(ttl_s * 1000)

    def key(self, worker_id: str) -> str:
        return f"{self.prefix}worker:{worker_id}"

    def register(self, worker_id: str, role: Role, fingerprint: str) -> None:
        self.heartbeat(worker_id, role, fingerprint, load=0, stats={})

    def heartbeat(self, worker_id: str, role: Role, fingerprint: str, load: int,
                  stats: dict[str, int]) -> None:
        """Refresh the worker's record and its TTL."""
        key = self.key(worker_id)
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(key, mapping={"role": role, "fingerprint": fingerprint, "load": load,
                                "stats": json.dumps(stats), "heartbeat_ms": int(time.time() * 1000)})
        pipe.pexpire(key, self.ttl_ms)
        pipe.execute()

    def deregister(self, worker_id: str) -> None:
        self.client.delete(self.key(worker_id))

    def live_workers(self, role: Role | None = None) -> list[WorkerInfo]:
        """Workers whose heartbeat has not lapsed, least loaded first."""
        out = []
        for raw_key in self.client.scan_iter(match=f"{self.prefix}worker:*", count=500):
            key = text(raw_key)
            h = text_hash(self.client.hgetall(key))
            if not h or (role is not None and h.get("role") != role):
                continue
            out.append(WorkerInfo(
                worker_id=key.removeprefix(f"{self.prefix}worker:"), role=h["role"],  # type: ignore[arg-type]
                fingerprint=h.get("fingerprint", ""), load=int(h.get("load", 0)),
                stats=json.loads(h.get("stats", "{}")), heartbeat_ms=int(h.get("heartbeat_ms", 0)),
            ))
        return sorted(out, key=lambda w: (w.load, w.worker_id))
