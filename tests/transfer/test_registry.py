"""The worker registry: heartbeats keep a worker listed; a silent worker drops out."""

from __future__ import annotations

import time

import redis

from services.transfer import WorkerRegistry


def test_workers_are_listed_by_role_least_loaded_first(client: redis.Redis, prefix: str) -> None:
    reg = WorkerRegistry(client, prefix=prefix, ttl_s=5)
    reg.register("clsa-prefill-0", "prefill", "fp")
    reg.register("clsa-decode-0", "decode", "fp")
    reg.register("clsa-decode-1", "decode", "fp")
    reg.heartbeat("clsa-decode-0", "decode", "fp", load=3, stats={"kv_blocks_used": 12})
    decode = reg.live_workers("decode")
    assert [w.worker_id for w in decode] == ["clsa-decode-1", "clsa-decode-0"]
    assert decode[1].load == 3 and decode[1].stats == {"kv_blocks_used": 12}
    assert [w.worker_id for w in reg.live_workers("prefill")] == ["clsa-prefill-0"]
    assert client.exists(f"{prefix}worker:clsa-decode-0")  # the documented key


def test_a_worker_that_stops_heartbeating_drops_out(client: redis.Redis, prefix: str) -> None:
    reg = WorkerRegistry(client, prefix=prefix, ttl_s=1.0)
    reg.register("clsa-decode-0", "decode", "fp")
    reg.register("clsa-decode-1", "decode", "fp")
    for _ in range(5):  # 1.25 s: decode-0's TTL runs out, decode-1 beats well within its TTL
        time.sleep(0.25)
        reg.heartbeat("clsa-decode-1", "decode", "fp", load=0, stats={})
    assert [w.worker_id for w in reg.live_workers()] == ["clsa-decode-1"]
    reg.deregister("clsa-decode-1")
    assert reg.live_workers() == []
