"""The gateway over a real socket: results equal the engine's own, streams, bad input, cancel and
deadlines leave nothing behind, health and reflection."""

from __future__ import annotations

import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from services.engine import EngineConfig, LLMEngine, SamplingParams
from services.gateway.server import pb2
from tests.gateway.conftest import Gateway
from tests.helpers import run_in_threads

PROMPT = "The pass key is 71432. Remember it."


def _request(attention: int, **sampling: object) -> pb2.GenerateRequest:
    return pb2.GenerateRequest(text=PROMPT, attention=attention,
                               sampling=pb2.SamplingParams(max_tokens=12, ignore_eos=True, **sampling))


def _engine_tokens(attention: str, **sampling: object) -> list[int]:
    engine = LLMEngine.from_model("clsa-tiny", EngineConfig(max_num_seqs=2))
    params = SamplingParams(max_tokens=12, ignore_eos=True, **sampling)  # type: ignore[arg-type]
    return engine.generate([PROMPT], params, attention=attention)[0].token_ids  # type: ignore[arg-type]


def _wait_idle(gateway: Gateway) -> dict[str, int]:
    for _ in range(100):
        stats = gateway.backend.stats()
        if stats["requests_in_flight"] == 0 and stats["kv_blocks_used"] == 0:
            return stats
        time.sleep(0.05)
    return gateway.backend.stats()


@pytest.mark.parametrize(("mode", "attention"), [("clsa", pb2.ATTENTION_MODE_CLSA),
                                                 ("dense", pb2.ATTENTION_MODE_DENSE)])
def test_unary_and_stream_equal_the_engine(gateway: Gateway, mode: str, attention: int) -> None:
    sampling = {"temperature": 0.8, "seed": 7}
    want = _engine_tokens(mode, **sampling)
    unary = gateway.stub.Complete(_request(attention, **sampling), timeout=60)
    assert list(unary.token_ids) == want
    assert unary.finish_reason == pb2.FINISH_REASON_LENGTH
    assert (unary.usage.prompt_tokens, unary.usage.completion_tokens) == (len(PROMPT), 12)
    assert unary.timings.ttft_ms > 0
    stream = list(gateway.stub.Generate(_request(attention, **sampling), timeout=60))
    assert [t for m in stream for t in m.token_ids] == want
    assert "".join(m.text for m in stream) == unary.text
    assert all(m.finish_reason == pb2.FINISH_REASON_UNSPECIFIED for m in stream[:-1])
    assert stream[-1].finish_reason == pb2.FINISH_REASON_LENGTH


def test_concurrent_streams_all_finish_correctly(gateway: Gateway) -> None:
    want = _engine_tokens("clsa", temperature=0.8, seed=11)

    def client() -> list[int]:
        return [t for m in gateway.stub.Generate(_request(0, temperature=0.8, seed=11), timeout=120)
                for t in m.token_ids]

    assert run_in_threads(client, 16) == [want] * 16
    assert _wait_idle(gateway)["kv_blocks_used"] == 0


@pytest.mark.parametrize(
    ("request_msg", "code", "message"),
    [
        (pb2.GenerateRequest(), grpc.StatusCode.INVALID_ARGUMENT, "prompt: set text or token_ids"),
        (pb2.GenerateRequest(token_ids=pb2.TokenIds(ids=[999])), grpc.StatusCode.INVALID_ARGUMENT,
         "prompt.token_ids: token id 999 outside"),
        (pb2.GenerateRequest(text="x", sampling=pb2.SamplingParams(top_p=2)), grpc.StatusCode.INVALID_ARGUMENT,
         "sampling.top_p"),
        (pb2.GenerateRequest(text="x", sampling=pb2.SamplingParams(max_tokens=0)),
         grpc.StatusCode.INVALID_ARGUMENT, "sampling.max_tokens"),
        (pb2.GenerateRequest(text="x" * 9000), grpc.StatusCode.INVALID_ARGUMENT, "max_seq_len is 8192"),
        (pb2.GenerateRequest(text="x", attention=9), grpc.StatusCode.INVALID_ARGUMENT, "attention"),
    ],
)
def test_bad_requests_get_a_precise_status(gateway: Gateway, request_msg: pb2.GenerateRequest,
                                           code: grpc.StatusCode, message: str) -> None:
    for call in (gateway.stub.Complete, lambda r, timeout: list(gateway.stub.Generate(r, timeout=timeout))):
        with pytest.raises(grpc.RpcError) as err:
            call(request_msg, timeout=30)
        assert err.value.code() == code and message in err.value.details()
    assert gateway.stub.Complete(_request(0), timeout=60).usage.completion_tokens == 12  # still serving


def test_client_cancel_and_deadline_free_the_request(gateway: Gateway) -> None:
    long = pb2.GenerateRequest(text=PROMPT, sampling=pb2.SamplingParams(max_tokens=4000, ignore_eos=True))
    stream = gateway.stub.Generate(long, timeout=120)
    next(stream)
    next(stream)
    stream.cancel()
    assert _wait_idle(gateway) == {"requests_in_flight": 0, "requests_waiting": 0, "kv_blocks_used": 0,
                                   "kv_blocks_total": gateway.backend.engine.cache.num_blocks,
                                   "kv_block_size": gateway.backend.engine.config.block_size}
    with pytest.raises(grpc.RpcError) as err:
        gateway.stub.Complete(long, timeout=0.3)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert _wait_idle(gateway)["kv_blocks_used"] == 0 and not gateway.backend.engine.has_unfinished_requests()


def test_tokenize_and_model_info(gateway: Gateway) -> None:
    assert list(gateway.stub.Tokenize(pb2.TokenizeRequest(text="hi"), timeout=10).token_ids) == [104, 105]
    info = gateway.stub.GetModelInfo(pb2.GetModelInfoRequest(), timeout=10)
    assert (info.model, info.arch, info.vocab_size, info.index_topk) == ("clsa-tiny", "yoco", 259, 128)
    assert list(info.attention_modes) == [pb2.ATTENTION_MODE_CLSA, pb2.ATTENTION_MODE_DENSE]
    assert len(info.fingerprint) == 16


def test_health_and_reflection(gateway: Gateway) -> None:
    health = health_pb2_grpc.HealthStub(gateway.channel)
    for service in ("", "clsa.v1.Generation"):
        status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(gateway.channel)
    [answer] = list(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                              timeout=10))
    names = {s.name for s in answer.list_services_response.service}
    assert {"clsa.v1.Generation", "grpc.health.v1.Health"} <= names


def test_metrics_endpoint_counts_requests_latencies_and_kv(gateway: Gateway) -> None:
    import urllib.request

    def scrape() -> dict[str, float]:
        text = urllib.request.urlopen(gateway.metrics_url, timeout=10).read().decode()
        return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
                for line in text.splitlines() if line and not line.startswith("#")}

    before = scrape()
    gateway.stub.Complete(_request(0), timeout=60)
    with pytest.raises(grpc.RpcError):
        gateway.stub.Complete(pb2.GenerateRequest(), timeout=10)
    after = scrape()

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert delta('clsa_requests_total{status="OK"}') == 1
    assert delta('clsa_requests_total{status="INVALID_ARGUMENT"}') == 1
    assert delta("clsa_ttft_seconds_count") == 1 and delta("clsa_ttft_seconds_sum") > 0
    assert delta("clsa_inter_token_latency_seconds_count") == 11  # 12 tokens, 11 gaps
    assert delta("clsa_generated_tokens_total") == 12
    assert after["clsa_kv_blocks_in_use"] == 0 and after["clsa_kv_blocks_total"] > 0
