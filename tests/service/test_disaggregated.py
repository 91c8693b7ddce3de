"""Through a real gRPC client, the disaggregated service (Ray prefill -> Redis-tracked transfer ->
Ray decode) gives the engine's own tokens and leaves nothing behind."""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from services.engine import EngineConfig, LLMEngine, SamplingParams
from services.gateway.server import pb2
from services.transfer import TransferState
from tests.service.conftest import Service

PROMPT = "There is an important info hidden inside a lot of irrelevant text."


def _engine_tokens(attention: str, **sampling: object) -> list[int]:
    engine = LLMEngine.from_model("clsa-tiny", EngineConfig(max_num_seqs=2))
    params = SamplingParams(max_tokens=12, ignore_eos=True, **sampling)  # type: ignore[arg-type]
    return engine.generate([PROMPT], params, attention=attention)[0].token_ids  # type: ignore[arg-type]


def _request(attention: int = 0, max_tokens: int = 12, **sampling: object) -> pb2.GenerateRequest:
    return pb2.GenerateRequest(text=PROMPT, attention=attention,
                               sampling=pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=True, **sampling))


def _settled(service: Service) -> tuple[list, dict[str, int]]:
    for _ in range(100):
        live = service.ledger.records([TransferState.PENDING, TransferState.READY, TransferState.CLAIMED])
        stats = service.backend.stats()
        if not live and stats["kv_blocks_used"] == 0 and stats["requests_in_flight"] == 0:
            break
        time.sleep(0.1)
    return live, stats


@pytest.mark.parametrize(("mode", "attention"), [("clsa", pb2.ATTENTION_MODE_CLSA),
                                                 ("dense", pb2.ATTENTION_MODE_DENSE)])
def test_unary_and_stream_equal_the_engine(service: Service, mode: str, attention: int) -> None:
    want = _engine_tokens(mode, temperature=0.9, seed=4)
    unary = service.stub.Complete(_request(attention, temperature=0.9, seed=4), timeout=120)
    assert list(unary.token_ids) == want and unary.finish_reason == pb2.FINISH_REASON_LENGTH
    stream = list(service.stub.Generate(_request(attention, temperature=0.9, seed=4), timeout=120))
    assert [t for m in stream for t in m.token_ids] == want
    done = service.ledger.records([TransferState.DONE])
    assert done and done[-1].producer == "clsa-prefill-0" and done[-1].consumer == "clsa-decode-0"
    assert done[-1].n_tokens == len(PROMPT) and done[-1].nbytes > 0
    timings = stream[-1].timings
    assert timings.prefill_ms > 0 and timings.queue_ms >= 0 and timings.transfer_ms == done[-1].transfer_ms
    assert timings.ttft_ms >= timings.prefill_ms


def test_concurrent_streams(service: Service) -> None:
    want = _engine_tokens("clsa", temperature=0.0)
    results: list[list[int]] = []
    lock = threading.Lock()

    def client() -> None:
        tokens = [t for m in service.stub.Generate(_request(temperature=0.0), timeout=180) for t in m.token_ids]
        with lock:
            results.append(tokens)

    threads = [threading.Thread(target=client) for _ in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [want] * 32
    live, stats = _settled(service)
    assert live == [] and stats["kv_blocks_used"] == 0


def test_cancel_mid_stream_frees_kv_and_ends_the_transfer(service: Service) -> None:
    stream = service.stub.Generate(_request(max_tokens=3000), timeout=180)
    for _ in range(3):
        next(stream)
    stream.cancel()
    live, stats = _settled(service)
    assert live == [] and stats["kv_blocks_used"] == 0 and stats["requests_in_flight"] == 0
    assert service.backend.handles_in_flight == 0  # the bundle's handle is dropped too


def test_deadline_shorter_than_the_request_ends_it_and_frees_kv(service: Service) -> None:
    with pytest.raises(grpc.RpcError) as err:
        service.stub.Complete(_request(max_tokens=3000), timeout=1.0)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    live, stats = _settled(service)
    assert live == [] and stats["kv_blocks_used"] == 0 and stats["requests_in_flight"] == 0


def test_bad_input_never_reaches_a_worker(service: Service) -> None:
    before = len(service.ledger.records())
    with pytest.raises(grpc.RpcError) as err:
        service.stub.Complete(pb2.GenerateRequest(text="x", sampling=pb2.SamplingParams(top_p=0)), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "sampling.top_p" in err.value.details()
    assert len(service.ledger.records()) == before


def test_admission_limit_sheds_with_resource_exhausted(service: Service) -> None:
    service.backend.max_in_flight = 2
    try:
        streams = [service.stub.Generate(_request(max_tokens=3000), timeout=60) for _ in range(2)]
        for s in streams:
            next(s)
        with pytest.raises(grpc.RpcError) as err:
            service.stub.Complete(_request(), timeout=30)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "2 requests in flight" in err.value.details()
        for s in streams:
            s.cancel()
    finally:
        service.backend.max_in_flight = 256
    live, stats = _settled(service)
    assert live == [] and stats["kv_blocks_used"] == 0


def test_metrics_count_transfers_by_state(service: Service) -> None:
    from prometheus_client import generate_latest

    service.stub.Complete(_request(), timeout=60)
    text = generate_latest(service.metrics.registry).decode()
    [done] = [float(line.split()[-1]) for line in text.splitlines() if line.startswith('clsa_transfers{state="DONE"}')]
    assert done >= 1
    for stage in ("queue", "prefill", "transfer", "decode"):
        assert f"clsa_{stage}_seconds_count" in text
        [count] = [float(line.split()[-1]) for line in text.splitlines()
                   if line.startswith(f"clsa_{stage}_seconds_count")]
        assert count >= 1, stage
    assert 'clsa_transfers{state="READY"} 0.0' in text and 'clsa_transfers{state="CLAIMED"} 0.0' in text
