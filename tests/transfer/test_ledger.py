"""The transfer ledger's state machine against a real redis-server."""

from __future__ import annotations

import threading
import time

import pytest
import redis

from services.transfer import InvalidTransition, LedgerError, TransferLedger, TransferState, UnknownTransfer
from services.transfer.ledger import now_ms
from tests.helpers import run_in_threads


def ledger(client: redis.Redis, prefix: str, **kwargs: int) -> TransferLedger:
    return TransferLedger(client, prefix=prefix, **kwargs)


def test_lifecycle_records_every_field(client: redis.Redis, prefix: str) -> None:
    lg = ledger(client, prefix)
    tid = lg.create("req-1", producer="clsa-prefill-0", fingerprint="fp1")
    rec = lg.get(tid)
    assert rec.state is TransferState.PENDING and rec.request_id == "req-1" and rec.producer == "clsa-prefill-0"
    assert rec.fingerprint == "fp1" and rec.created_ms == rec.updated_ms and rec.deadline_ms > rec.created_ms
    assert client.exists(f"{prefix}xfer:{tid}")  # the documented key

    lg.mark_ready(tid, n_tokens=300, nbytes=1_305_600)
    lg.claim(tid, consumer="clsa-decode-1")
    rec = lg.get(tid)
    assert (rec.state, rec.consumer, rec.n_tokens, rec.nbytes) == (TransferState.CLAIMED, "clsa-decode-1", 300,
                                                                   1_305_600)
    lg.complete(tid, consumer="clsa-decode-1")
    rec = lg.get(tid)
    assert rec.state is TransferState.DONE and rec.deadline_ms == 0 and rec.updated_ms >= rec.created_ms
    assert 0 < client.pttl(f"{prefix}xfer:{tid}") <= 3600 * 1000  # terminal records expire
    assert lg.reap(now=now_ms() + 10**9) == []  # a terminal record is never reaped


@pytest.mark.parametrize(
    ("steps", "bad"),
    [
        ([], "claim"),  # PENDING cannot be claimed
        ([], "complete"),
        (["ready"], "ready"),  # READY twice
        (["ready"], "complete"),  # not claimed yet
        (["ready", "claim"], "claim"),  # already claimed
        (["ready", "claim", "complete"], "fail"),  # terminal stays terminal
        (["ready", "claim", "complete"], "renew"),
        (["fail"], "ready"),
    ],
)
def test_invalid_transitions_are_refused_and_change_nothing(client: redis.Redis, prefix: str, steps: list[str],
                                                            bad: str) -> None:
    lg = ledger(client, prefix)
    tid = lg.create("r", "p", "fp")
    actions = {
        "ready": lambda: lg.mark_ready(tid, 1, 1), "claim": lambda: lg.claim(tid, "d"),
        "complete": lambda: lg.complete(tid, "d"), "fail": lambda: lg.fail(tid, "boom"),
        "renew": lambda: lg.renew_lease(tid, "d"),
    }
    for step in steps:
        actions[step]()
    before = lg.get(tid)
    with pytest.raises(InvalidTransition, match="is not allowed"):
        actions[bad]()
    assert lg.get(tid) == before


def test_exactly_one_of_concurrent_claims_wins(redis_url: str, prefix: str) -> None:
    lg = TransferLedger.from_url(redis_url, prefix=prefix)
    tids = [lg.create(f"r{i}", "p", "fp") for i in range(5)]
    for tid in tids:
        lg.mark_ready(tid, 1, 1)
    wins: list[tuple[str, str]] = []
    lock = threading.Lock()
    barrier = threading.Barrier(16)

    def claimer(name: str) -> None:
        mine = TransferLedger.from_url(redis_url, prefix=prefix)  # its own connection
        barrier.wait()
        for tid in tids:
            try:
                mine.claim(tid, name)
            except InvalidTransition:
                continue
            with lock:
                wins.append((tid, name))

    threads = [threading.Thread(target=claimer, args=(f"decode-{i}",)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(tid for tid, _ in wins) == sorted(tids)  # each transfer claimed exactly once
    for tid, name in wins:
        assert lg.get(tid).consumer == name


def test_lease_renewal_by_owner_only(client: redis.Redis, prefix: str) -> None:
    lg = ledger(client, prefix, lease_ms=200)
    tid = lg.create("r", "p", "fp")
    lg.mark_ready(tid, 1, 1)
    lg.claim(tid, "decode-0")
    first = lg.get(tid).deadline_ms
    time.sleep(0.02)
    lg.renew_lease(tid, "decode-0")
    assert lg.get(tid).deadline_ms > first
    with pytest.raises(InvalidTransition, match="claimed by 'decode-0', not 'decode-1'"):
        lg.renew_lease(tid, "decode-1")
    with pytest.raises(InvalidTransition, match="claimed by 'decode-0'"):
        lg.complete(tid, "decode-1")


def test_reaper_expires_lapsed_leases_and_stale_records_once(client: redis.Redis, prefix: str) -> None:
    lg = ledger(client, prefix, lease_ms=300, ready_timeout_ms=300)
    stale = lg.create("r-stale", "p", "fp")  # producer died before READY
    lapsed = lg.create("r-lapsed", "p", "fp")
    lg.mark_ready(lapsed, 1, 1)
    lg.claim(lapsed, "decode-0")  # consumer died without renewing
    alive = lg.create("r-alive", "p", "fp")
    released: list[str] = []
    assert lg.reap(lambda rec: released.append(rec.transfer_id)) == []  # nothing past its deadline yet
    time.sleep(0.5)
    lg.mark_ready(alive, 1, 1)  # a transition moves the deadline
    expired = lg.reap(lambda rec: released.append(rec.transfer_id))
    assert sorted(expired) == sorted([stale, lapsed]) and sorted(released) == sorted(expired)
    assert lg.get(stale).state is TransferState.EXPIRED and lg.get(stale).error == "expired in PENDING"
    assert lg.get(lapsed).error == "expired in CLAIMED"
    assert lg.get(alive).state is TransferState.READY
    assert lg.reap(lambda rec: released.append(rec.transfer_id)) == [] and len(released) == 2  # idempotent
    with pytest.raises(InvalidTransition):
        lg.complete(lapsed, "decode-0")  # too late: the consumer must start over


def test_concurrent_reapers_release_each_record_once(redis_url: str, prefix: str) -> None:
    lg = TransferLedger.from_url(redis_url, prefix=prefix, ready_timeout_ms=1)
    tids = [lg.create(f"r{i}", "p", "fp") for i in range(40)]
    time.sleep(0.01)

    def reaper() -> list[str]:
        return TransferLedger.from_url(redis_url, prefix=prefix).reap(lambda rec: None)

    released = [tid for batch in run_in_threads(reaper, 6) for tid in batch]
    assert sorted(released) == sorted(tids)


@pytest.mark.parametrize("steps", [[], ["ready"], ["ready", "claim"]])
def test_fail_from_any_live_state_records_the_error(client: redis.Redis, prefix: str, steps: list[str]) -> None:
    lg = ledger(client, prefix)
    tid = lg.create("r", "p", "fp")
    if "ready" in steps:
        lg.mark_ready(tid, 1, 1)
    if "claim" in steps:
        lg.claim(tid, "d")
    lg.fail(tid, "prefill worker died")
    rec = lg.get(tid)
    assert rec.state is TransferState.FAILED and rec.error == "prefill worker died" and rec.deadline_ms == 0
    assert lg.reap(now=now_ms() + 10**9) == []


def test_unknown_and_duplicate_ids(client: redis.Redis, prefix: str) -> None:
    lg = ledger(client, prefix)
    with pytest.raises(UnknownTransfer, match="no such record"):
        lg.claim("nope", "d")
    with pytest.raises(UnknownTransfer):
        lg.get("nope")
    lg.create("r", "p", "fp", transfer_id="fixed")
    with pytest.raises(LedgerError, match="already exists"):
        lg.create("r", "p", "fp", transfer_id="fixed")


def test_records_lists_by_state_under_the_prefix_only(client: redis.Redis, prefix: str) -> None:
    lg = ledger(client, prefix)
    a = lg.create("a", "p", "fp")
    b = lg.create("b", "p", "fp")
    lg.mark_ready(b, 1, 1)
    other = ledger(client, prefix + "other:")
    other.create("c", "p", "fp")
    assert sorted(r.transfer_id for r in lg.records()) == sorted([a, b])  # same-millisecond ties: no order
    assert [r.transfer_id for r in lg.records([TransferState.READY])] == [b]


def test_clsa_transfers_lists_the_ledger(client: redis.Redis, redis_url: str, prefix: str) -> None:
    import json
    import subprocess
    import sys
    from pathlib import Path

    lg = ledger(client, prefix)
    done = lg.create("req-done", "clsa-prefill-0", "fp")
    lg.mark_ready(done, 300, 2**21)
    lg.claim(done, "clsa-decode-0")
    lg.complete(done, "clsa-decode-0")
    failed = lg.create("req-failed", "clsa-prefill-0", "fp")
    lg.fail(failed, "prefill worker died")
    clsa = str(Path(sys.executable).parent / "clsa")
    table = subprocess.run([clsa, "transfers", "--redis-url", redis_url, "--prefix", prefix],
                           capture_output=True, text=True, timeout=60)
    assert table.returncode == 0, table.stderr
    assert "req-done" in table.stdout and "DONE" in table.stdout and "2.00" in table.stdout
    assert "prefill worker died" in table.stdout and "2 transfers: DONE 1, FAILED 1" in table.stdout
    only = subprocess.run([clsa, "transfers", "--redis-url", redis_url, "--prefix", prefix, "--state", "FAILED",
                           "--json"], capture_output=True, text=True, timeout=60)
    assert [r["request_id"] for r in json.loads(only.stdout)] == ["req-failed"]
    down = subprocess.run([clsa, "transfers", "--redis-url", "redis://127.0.0.1:1/0"], capture_output=True,
                          text=True, timeout=60)
    assert down.returncode == 2 and "cannot reach Redis" in down.stderr and "Traceback" not in down.stderr


def test_a_request_finished_at_prefill_settles_as_done(client: redis.Redis, prefix: str) -> None:
    lg = ledger(client, prefix)
    tid = lg.create("r", "p", "fp")
    lg.finish_at_prefill(tid, n_tokens=1)
    rec = lg.get(tid)
    assert rec.state is TransferState.DONE and rec.n_tokens == 1 and rec.deadline_ms == 0
    ready = lg.create("r2", "p", "fp")
    lg.mark_ready(ready, 1, 1)
    with pytest.raises(InvalidTransition, match="READY -> DONE is not allowed"):
        lg.finish_at_prefill(ready, n_tokens=1)


def test_an_abandoned_request_refuses_the_late_bundle(client: redis.Redis, prefix: str) -> None:
    lg = ledger(client, prefix)
    tid = lg.create("r", "p", "fp")
    lg.fail(tid, "gateway: the request ended before it finished")  # client gone during prefill
    with pytest.raises(InvalidTransition, match="FAILED -> READY"):
        lg.mark_ready(tid, 10, 100)  # the prefill worker then drops its bundle
