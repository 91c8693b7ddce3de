"""Fault injection against the real service, under load from `clsa bench serve`'s engine.

Each case ends with the same invariants (`FaultyService.check_invariants`): every request got
exactly one terminal status; no transfer record is left outside a terminal state; the decode
workers' KV blocks in use are back to zero; and the service serves a new request. Worker crashes
are real process exits (`os._exit` inside the Ray actor, armed through `inject_fault`), which Ray
answers by restarting the actor; the worker then registers again.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from typing import Any

import grpc
import pytest
import ray

from services.bench.serve import BenchConfig, BenchResult, run_bench
from services.gateway.server import pb2
from services.transfer import TransferState
from tests.faults.conftest import BLOCK_SIZE, DECODE_BLOCKS, MAX_IN_FLIGHT, FaultyService

TERMINAL = {"OK", "UNAVAILABLE", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED", "CANCELLED"}


def load(svc: FaultyService, n: int, **kw: Any) -> BenchResult:
    cfg = BenchConfig(address=svc.address, num_prompts=n, warmup=0, progress=False, timeout_s=120,
                      **{"input_len": "uniform:30,120", "output_len": "fixed:24", **kw})
    return run_bench(cfg)


def in_background(fn: Any) -> tuple[threading.Thread, dict[str, Any]]:
    box: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: box.setdefault("result", fn()), daemon=True)
    thread.start()
    return thread, box


def exactly_one_terminal_status(result: BenchResult, n: int) -> dict[str, int]:
    assert len(result.records) == n and {r.index for r in result.records} == set(range(n))
    counts = result.status_counts()
    assert set(counts) <= TERMINAL, counts
    return counts


def test_a_prefill_worker_crash_is_retried_on_the_other_worker(svc: FaultyService) -> None:
    ray.get(svc.prefill[0].inject_fault.remote("crash_in_prefill"))
    retries = svc.backend.retries
    result = load(svc, 8, max_concurrency=4)
    counts = exactly_one_terminal_status(result, 8)
    assert counts == {"OK": 8}, [r.detail for r in result.records if r.status != "OK"]
    # One worker died; the requests it held (those sent before the gateway knew) went to the other
    # one, and no client heard of it. Until it registers again it gets no new request.
    assert svc.backend.retries >= retries + 1
    failed = [r for r in svc.ledger.records([TransferState.FAILED]) if "prefill on clsa-prefill-0" in r.error]
    assert failed  # the dead attempt's record was settled at once, not left PENDING
    svc.outcome("prefill worker killed mid-prefill", counts, svc.check_invariants(),
                retried=svc.backend.retries - retries)


def test_a_prefill_that_dies_twice_is_unavailable_at_once(svc: FaultyService) -> None:
    ray.get([w.inject_fault.remote("crash_in_prefill") for w in svc.prefill])
    t0 = time.monotonic()
    result = load(svc, 4, max_concurrency=1)  # one after another: the first meets both crashes
    counts = exactly_one_terminal_status(result, 4)
    first = min(result.records, key=lambda r: r.index)
    assert first.status == "UNAVAILABLE" and "prefill failed twice" in first.detail, (first.status, first.detail)
    # The rest came while the workers restarted: refused at once or served, never a hang.
    assert set(counts) <= {"OK", "UNAVAILABLE"}, counts
    assert all(r.status == "OK" or "prefill" in r.detail for r in result.records), [r.detail for r in result.records]
    assert time.monotonic() - t0 < 60  # pushed to the client, not a timeout waited out
    svc.outcome("prefill fails on both workers", counts, svc.check_invariants())


def _stream_tokens(svc: FaultyService, prompts: list[str], max_tokens: int) -> list[list[int] | str]:
    """Each prompt streamed at once through Generate (greedy): its token ids, or the status name."""
    from services.gateway.server import pb2_grpc

    async def one(stub: Any, prompt: str) -> list[int] | str:
        request = pb2.GenerateRequest(text=prompt, sampling=pb2.SamplingParams(max_tokens=max_tokens,
                                                                                ignore_eos=True, temperature=0.0))
        tokens: list[int] = []
        try:
            async for msg in stub.Generate(request, timeout=120):
                tokens += msg.token_ids
        except grpc.aio.AioRpcError as e:
            return f"{e.code().name}: {e.details()}"
        return tokens

    async def main() -> list[list[int] | str]:
        async with grpc.aio.insecure_channel(svc.address) as channel:
            stub = pb2_grpc.GenerationStub(channel)
            return list(await asyncio.gather(*(one(stub, p) for p in prompts)))

    return asyncio.run(main())


def test_a_decode_worker_killed_mid_stream_is_resumed_on_the_other_with_the_same_tokens(svc: FaultyService) -> None:
    prompts = [f"request {i}: " + "tell me more " * (3 + 2 * i) for i in range(4)]
    before = {r.transfer_id for r in svc.ledger.records()}
    ray.get(svc.decode[0].inject_fault.remote("crash_mid_stream", 5))
    resumes = svc.backend.resumes
    got = _stream_tokens(svc, prompts, 40)  # two of the four land on clsa-decode-0, which dies at token 6
    assert svc.backend.resumes >= resumes + 1, got
    svc.clear_faults()
    want = _stream_tokens(svc, prompts, 40)  # the same prompts with nothing killed
    assert all(isinstance(w, list) and len(w) == 40 for w in want), want
    assert got == want  # the clients saw no gap, no repeat and no other token
    # A resumed request has two transfers of its one bundle: to the worker that died (DONE, or
    # FAILED when it died before the bundle was in - unclaimed, when it died before claiming it),
    # then again (DONE).
    records: dict[str, list[Any]] = {}
    for r in svc.ledger.records():
        if r.transfer_id not in before:
            records.setdefault(r.request_id, []).append(r)
    twice = [rs for rs in records.values() if len(rs) == 2]
    assert len(twice) == svc.backend.resumes - resumes, {k: [(r.state.name, r.consumer) for r in v]
                                                         for k, v in records.items()}
    for first, again in sorted(twice, key=lambda rs: rs[0].created_ms):
        first, again = sorted((first, again), key=lambda r: (r.created_ms, r.consumer != "clsa-decode-0"))
        unclaimed = first.consumer == "" and first.state == TransferState.FAILED
        assert (first.consumer == "clsa-decode-0" or unclaimed) and again.state == TransferState.DONE, (first, again)
        assert first.state == TransferState.DONE or "resumed elsewhere" in first.error, first
    svc.outcome("a decode worker killed mid-stream (4 streams, 2 on it)", {"OK": 4}, svc.check_invariants(),
                resumed=svc.backend.resumes - resumes)


def test_both_decode_workers_killed_mid_stream(svc: FaultyService) -> None:
    ray.get([w.inject_fault.remote("crash_mid_stream", 5) for w in svc.decode])
    resumes = svc.backend.resumes
    result = load(svc, 6, output_len="fixed:60")
    counts = exactly_one_terminal_status(result, 6)
    # Each stream is resumed on the other worker, and when that one dies too, on the first again,
    # restarted by Ray: every client gets all its tokens.
    assert counts == {"OK": 6}, [r.detail for r in result.records if r.status != "OK"]
    assert all(r.tokens == 60 for r in result.records)
    assert svc.backend.resumes >= resumes + 6
    svc.outcome("both decode workers killed mid-stream", counts, svc.check_invariants(),
                resumed=svc.backend.resumes - resumes)


def test_a_decode_worker_killed_during_the_transfer_is_resumed(svc: FaultyService) -> None:
    before = {r.transfer_id for r in svc.ledger.records()}
    ray.get(svc.decode[0].inject_fault.remote("crash_in_transfer"))
    resumes = svc.backend.resumes
    # The gateway routes by the workers' last heartbeats, so a burst can all go to clsa-decode-1
    # (it once did): send bursts until clsa-decode-0 has claimed a transfer, three at most.
    counts: dict[str, int] = {}
    for _ in range(3):
        result = load(svc, 6, max_concurrency=3)
        burst = exactly_one_terminal_status(result, 6)
        assert burst == {"OK": 6}, [r.detail for r in result.records if r.status != "OK"]
        assert all(r.tokens == 24 for r in result.records)
        counts = {status: counts.get(status, 0) + n for status, n in burst.items()}
        new = [r for r in svc.ledger.records() if r.transfer_id not in before]
        if any(r.consumer == "clsa-decode-0" for r in new):
            break
    # Claimed by the worker that died (CLAIMED), settled FAILED at once, and resumed elsewhere.
    claimed_then_failed = [r for r in new if r.state == TransferState.FAILED and r.consumer == "clsa-decode-0"]
    assert claimed_then_failed and all("resumed elsewhere" in r.error for r in claimed_then_failed), \
        [(r.state.name, r.consumer, r.error) for r in new]
    svc.outcome("a decode worker killed during the transfer", counts, svc.check_invariants(),
                resumed=svc.backend.resumes - resumes)


def test_a_redis_restart_fails_requests_cleanly_and_the_service_comes_back(svc: FaultyService) -> None:
    port = svc.redis.port
    svc.redis.stop()
    try:
        t0 = time.monotonic()
        result = load(svc, 4, max_concurrency=2)
        counts = exactly_one_terminal_status(result, 4)
        assert counts == {"UNAVAILABLE": 4}, [r.detail for r in result.records]
        assert "Redis" in result.records[0].detail
        refused_in = time.monotonic() - t0
        assert refused_in < 30  # each refused within seconds, none hangs
    finally:
        from services.transfer.local_redis import LocalRedis

        svc.redis = LocalRedis(port=port)  # empty: the workers register again with their next heartbeat
    svc.wait_workers_live()
    after = load(svc, 4, max_concurrency=2)
    assert exactly_one_terminal_status(after, 4) == {"OK": 4}
    total = {k: counts.get(k, 0) + after.status_counts().get(k, 0) for k in {*counts, *after.status_counts()}}
    svc.outcome("Redis stopped, then restarted empty", total, svc.check_invariants(),
                refused_while_down_s=round(refused_in, 1))


def test_clients_that_disconnect_at_random_points_leave_nothing(svc: FaultyService) -> None:
    rng = random.Random(5)
    statuses: list[str] = []

    async def client(i: int) -> None:
        request = pb2.GenerateRequest(text=f"client {i} " * rng.randint(2, 30),
                                      sampling=pb2.SamplingParams(max_tokens=80, ignore_eos=True))
        quit_after = rng.choice([0.0, 0.01, 0.05, 0.2, 0.5, 2.0, None])
        async with grpc.aio.insecure_channel(svc.address) as channel:
            from services.gateway.server import pb2_grpc

            call = pb2_grpc.GenerationStub(channel).Generate(request, timeout=120)
            try:
                if quit_after is None:
                    async for _ in call:
                        pass
                    statuses.append("OK")
                    return
                await asyncio.sleep(quit_after)
                call.cancel()
                statuses.append("CANCELLED")
            except grpc.aio.AioRpcError as e:
                statuses.append(e.code().name)

    async def main() -> None:
        await asyncio.gather(*(client(i) for i in range(16)))

    asyncio.run(main())
    assert len(statuses) == 16 and set(statuses) <= {"OK", "CANCELLED"}, statuses
    counts = {s: statuses.count(s) for s in set(statuses)}
    svc.outcome("clients disconnect at random points", counts, svc.check_invariants())


def test_deadlines_shorter_than_prefill(svc: FaultyService) -> None:
    thread, box = in_background(lambda: load(svc, 8, max_concurrency=2))  # the load the deadlines meet
    long_prompt = "a long prompt " * 285  # 3,990 tokens: a prefill that outlasts the deadlines
    codes = []
    for timeout in (0.001, 0.05, 0.2):
        with pytest.raises(grpc.RpcError) as info:
            svc.stub.Complete(pb2.GenerateRequest(text=long_prompt, sampling=pb2.SamplingParams(max_tokens=200)),
                              timeout=timeout)
        codes.append(info.value.code())
    assert codes == [grpc.StatusCode.DEADLINE_EXCEEDED] * 3
    thread.join(timeout=180)
    counts = exactly_one_terminal_status(box["result"], 8)
    assert counts == {"OK": 8}, counts  # the load around them is untouched
    counts["DEADLINE_EXCEEDED"] = 3
    svc.outcome("deadlines shorter than prefill (3, amid 8 others)", counts, svc.check_invariants())


def test_a_burst_far_above_the_admission_queue_is_shed(svc: FaultyService) -> None:
    result = load(svc, 6 * MAX_IN_FLIGHT, output_len="fixed:30")  # 144 at once against a limit of 24
    counts = exactly_one_terminal_status(result, 6 * MAX_IN_FLIGHT)
    assert set(counts) == {"OK", "RESOURCE_EXHAUSTED"} and counts["OK"] >= MAX_IN_FLIGHT, counts
    shed = [r for r in result.records if r.status == "RESOURCE_EXHAUSTED"]
    assert all(f"(max {MAX_IN_FLIGHT})" in r.detail for r in shed)
    svc.outcome(f"burst of {6 * MAX_IN_FLIGHT} against an admission limit of {MAX_IN_FLIGHT}", counts,
                svc.check_invariants())


def test_long_prompts_that_exhaust_the_decode_pool_wait_in_line_and_one_that_never_fits_is_refused(
        svc: FaultyService) -> None:
    pool = DECODE_BLOCKS * BLOCK_SIZE  # tokens per decode worker
    peak = {"used": 0, "waiting": 0}
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            stats = svc.decode_stats()
            peak["used"] = max(peak["used"], max(s["kv_blocks_used"] for s in stats))
            peak["waiting"] = max(peak["waiting"], sum(s["requests_waiting"] for s in stats))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    # Each needs 109-141 of a worker's 320 blocks and stays a while (200 new tokens): two fit at once,
    # the rest wait in line for room.
    result = load(svc, 8, input_len=f"uniform:{pool * 30 // 100},{pool * 40 // 100}", output_len="fixed:200")
    stop.set()
    watcher.join()
    counts = exactly_one_terminal_status(result, 8)
    assert counts == {"OK": 8}, [r.detail for r in result.records if r.status != "OK"]
    assert all(r.tokens == 200 for r in result.records)
    assert peak["used"] >= DECODE_BLOCKS // 2 and peak["waiting"] >= 1, peak
    assert peak["used"] <= DECODE_BLOCKS
    # One that no decode pool could ever hold: refused at once, before any prefill (no transfer record).
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        svc.stub.Complete(pb2.GenerateRequest(text="x" * (pool + 1), request_id="too-big-for-decode",
                                              sampling=pb2.SamplingParams(max_tokens=8)), timeout=60)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value.details()
    assert f"needs KV room for {pool + 9} tokens" in (info.value.details() or "")
    assert f"pool holds {pool}" in (info.value.details() or "")
    assert time.monotonic() - t0 < 5
    assert not [r for r in svc.ledger.records() if r.request_id == "too-big-for-decode"]
    counts["RESOURCE_EXHAUSTED"] = 1
    svc.outcome("decode pool exhausted by long prompts (+1 that never fits)", counts, svc.check_invariants(),
                peak_kv_blocks_used=peak["used"], kv_blocks_per_worker=DECODE_BLOCKS, peak_waiting=peak["waiting"])
