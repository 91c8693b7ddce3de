"""Malformed and hostile requests at the gRPC edge: each gets a precise status code and message,
none reaches the backend (the engine or the Ray workers behind it), and the gateway serves a good
request afterwards. Then the same property over random request messages (hypothesis)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from services.gateway.server import MAX_MESSAGE_BYTES, pb2
from tests.gateway.conftest import Gateway

VOCAB, MAX_SEQ = 259, 8192  # clsa-tiny
INVALID = grpc.StatusCode.INVALID_ARGUMENT


def req(text: str | None = "hello", ids: list[int] | None = None, **fields: Any) -> pb2.GenerateRequest:
    sampling = fields.pop("sampling", {"max_tokens": 4})
    msg = pb2.GenerateRequest(sampling=pb2.SamplingParams(**sampling), **fields)
    if ids is not None:
        msg.token_ids.ids.extend(ids)
    elif text is not None:
        msg.text = text
    return msg


def wire(field: int, payload: bytes) -> bytes:
    """One length-delimited protobuf field, to build messages no protobuf library would write."""
    tag, size, n = bytes([field << 3 | 2]), b"", len(payload)
    while True:
        size += bytes([(n & 0x7F) | (0x80 if n > 0x7F else 0)])
        n >>= 7
        if not n:
            return tag + size + payload


def s(**sampling: Any) -> dict[str, Any]:
    return {"sampling": {"max_tokens": 4, **sampling}}


# (name, request: a message or raw bytes, status, words the message must contain)
CASES: list[tuple[str, pb2.GenerateRequest | bytes, grpc.StatusCode, str]] = [
    ("no prompt", req(None), INVALID, "prompt: set text or token_ids"),
    ("empty text", req(""), INVALID, "prompt.text: is empty"),
    ("empty token ids", req(None, ids=[]), INVALID, "prompt"),
    ("token id = vocab size", req(None, ids=[1, VOCAB]), INVALID, f"token id {VOCAB} outside the vocabulary"),
    ("token id 2^32-1", req(None, ids=[2**32 - 1]), INVALID, "outside the vocabulary"),
    ("text longer than max_seq_len", req("x" * (MAX_SEQ + 5)), INVALID, f"max_seq_len is {MAX_SEQ}"),
    ("token ids longer than max_seq_len", req(None, ids=[7] * (MAX_SEQ + 1)), INVALID, f"max_seq_len is {MAX_SEQ}"),
    ("prompt of exactly max_seq_len", req(None, ids=[7] * MAX_SEQ), INVALID, "no room"),
    ("max_tokens 0", req(**s(max_tokens=0)), INVALID, "sampling.max_tokens"),
    ("max_tokens 10^9", req(**s(max_tokens=10**9)), INVALID, f"sampling.max_tokens: at most {MAX_SEQ}"),
    ("max_tokens 2^32-1", req(**s(max_tokens=2**32 - 1)), INVALID, "sampling.max_tokens"),
    ("temperature NaN", req(**s(temperature=float("nan"))), INVALID, "sampling.temperature"),
    ("temperature inf", req(**s(temperature=float("inf"))), INVALID, "sampling.temperature"),
    ("temperature -inf", req(**s(temperature=float("-inf"))), INVALID, "sampling.temperature"),
    ("temperature negative", req(**s(temperature=-0.5)), INVALID, "sampling.temperature"),
    ("top_p 0", req(**s(top_p=0.0)), INVALID, "sampling.top_p"),
    ("top_p 1.5", req(**s(top_p=1.5)), INVALID, "sampling.top_p"),
    ("top_p NaN", req(**s(top_p=float("nan"))), INVALID, "sampling.top_p"),
    ("top_p negative", req(**s(top_p=-0.1)), INVALID, "sampling.top_p"),
    ("seed 2^64-1", req(**s(seed=2**64 - 1)), INVALID, "sampling.seed"),
    ("empty stop string", req(**s(stop=[""])), INVALID, "sampling.stop"),
    ("stop string of 300 chars", req(**s(stop=["y" * 300])), INVALID, "sampling.stop"),
    ("65 stop strings", req(**s(stop=[f"s{i}" for i in range(65)])), INVALID, "at most 64 stop strings"),
    ("10^4 stop strings", req(**s(stop=[f"s{i}" for i in range(10_000)])), INVALID, "at most 64 stop strings"),
    ("stop token id = vocab size", req(**s(stop_token_ids=[VOCAB])), INVALID, "sampling.stop_token_ids"),
    ("stop token id 2^32-1", req(**s(stop_token_ids=[2**32 - 1])), INVALID, "sampling.stop_token_ids"),
    ("unknown attention mode 9", req(attention=9), INVALID, "unknown AttentionMode value 9"),
    ("negative attention mode", req(attention=-3), INVALID, "unknown AttentionMode value -3"),
    ("request id of 200 chars", req(request_id="r" * 200), INVALID, "request_id"),
    ("request id with a newline", req(request_id="a\nb"), INVALID, "request_id"),
    ("request id with a zero-width space", req(request_id="a\u200bb"), INVALID, "request_id"),
    ("invalid UTF-8 in the prompt", wire(2, b"ab\xff\xfecd"), INVALID, "not a valid clsa.v1.GenerateRequest"),
    ("invalid UTF-8 in a stop string", wire(2, b"hi") + wire(4, wire(6, b"\xc3\x28")), INVALID,
     "not a valid clsa.v1.GenerateRequest"),
    ("bytes that are not protobuf", b"\xff\xff\xff\xff\xff", INVALID, "not a valid clsa.v1.GenerateRequest"),
    ("a message over the size limit", req("z" * (MAX_MESSAGE_BYTES + 10)), grpc.StatusCode.RESOURCE_EXHAUSTED,
     "larger than max"),
]


@pytest.fixture()
def backend_calls(gateway: Gateway, monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every request that got past the edge into the backend."""
    calls: list[Any] = []
    real = gateway.backend.generate

    def counting(request: Any) -> Any:
        calls.append(request)
        return real(request)

    monkeypatch.setattr(gateway.backend, "generate", counting)
    return calls


def _call(gateway: Gateway, method: str, request: pb2.GenerateRequest | bytes, timeout: float = 30) -> Any:
    """Complete or Generate (drained) with a message, or with raw bytes as the request."""
    raw = isinstance(request, bytes)
    serialize: Callable[[Any], bytes] = (lambda b: b) if raw else pb2.GenerateRequest.SerializeToString
    path = f"/clsa.v1.Generation/{method}"
    if method == "Complete":
        rpc = gateway.channel.unary_unary(path, request_serializer=serialize,
                                          response_deserializer=pb2.GenerateResponse.FromString)
        return rpc(request, timeout=timeout)
    stream = gateway.channel.unary_stream(path, request_serializer=serialize,
                                          response_deserializer=pb2.GenerateResponse.FromString)
    return list(stream(request, timeout=timeout))


@pytest.mark.parametrize("method", ["Complete", "Generate"])
@pytest.mark.parametrize(("name", "request_msg", "code", "words"), CASES, ids=[c[0] for c in CASES])
def test_bad_request_gets_a_precise_status_and_reaches_no_worker(
        gateway: Gateway, backend_calls: list[Any], method: str, name: str,
        request_msg: pb2.GenerateRequest | bytes, code: grpc.StatusCode, words: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        _call(gateway, method, request_msg)
    assert info.value.code() == code, (name, info.value.details())
    assert words in (info.value.details() or ""), (name, info.value.details())
    assert backend_calls == []


def test_the_gateway_is_unharmed_after_the_table(gateway: Gateway, backend_calls: list[Any]) -> None:
    for _, request_msg, _, _ in CASES:
        with pytest.raises(grpc.RpcError):
            _call(gateway, "Complete", request_msg)
    out = gateway.stub.Complete(req("hello", sampling={"max_tokens": 5, "ignore_eos": True}), timeout=60)
    assert len(out.token_ids) == 5 and out.finish_reason == pb2.FINISH_REASON_LENGTH
    assert len(backend_calls) == 1
    stats = _idle(gateway)
    assert (stats["requests_in_flight"], stats["kv_blocks_used"]) == (0, 0)


def test_a_request_id_already_in_flight_is_refused(gateway: Gateway) -> None:
    long = req("hold", request_id="dup-1", sampling={"max_tokens": 2000, "ignore_eos": True})
    stream = gateway.stub.Generate(long, timeout=120)
    first = next(iter(stream))  # the first one is generating
    assert first.request_id == "dup-1"
    with pytest.raises(grpc.RpcError) as info:
        gateway.stub.Complete(req("again", request_id="dup-1"), timeout=30)
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS and "dup-1" in (info.value.details() or "")
    stream.cancel()
    assert _idle(gateway)["requests_in_flight"] == 0
    again = gateway.stub.Complete(req("again", request_id="dup-1"), timeout=60)  # free once it ended
    assert again.request_id == "dup-1"


def _idle(gateway: Gateway) -> dict[str, int]:
    for _ in range(200):
        stats = gateway.backend.stats()
        if stats["requests_in_flight"] == 0 and stats["kv_blocks_used"] == 0:
            return stats
        time.sleep(0.05)
    return gateway.backend.stats()


# ---- random messages -------------------------------------------------------------------------

FLOATS = st.one_of(st.none(), st.floats(0, 1, width=32), st.floats(allow_nan=True, allow_infinity=True, width=32))
SAMPLING = st.fixed_dictionaries({}, optional={
    "max_tokens": st.one_of(st.integers(1, 6), st.integers(0, 6), st.sampled_from([10**9, 2**32 - 1])),
    "temperature": FLOATS, "top_p": FLOATS, "top_k": st.integers(0, 2**32 - 1),
    "seed": st.integers(0, 2**64 - 1),
    "stop": st.lists(st.text(max_size=300), max_size=70),
    "stop_token_ids": st.lists(st.integers(0, 2**32 - 1), max_size=5),
    "ignore_eos": st.booleans(),
})
MESSAGES = st.builds(
    lambda text, ids, use_ids, sampling, attention, request_id: _random_request(
        text, ids, use_ids, sampling, attention, request_id),
    st.text(max_size=200), st.lists(st.one_of(st.integers(0, VOCAB - 1), st.integers(0, 2**32 - 1)), max_size=50),
    st.booleans(), SAMPLING, st.integers(-3, 6),
    st.one_of(st.just(""), st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=40),
              st.text(max_size=140)))


def _random_request(text: str, ids: list[int], use_ids: bool, sampling: dict[str, Any], attention: int,
                    request_id: str) -> pb2.GenerateRequest:
    sampling = {k: v for k, v in sampling.items() if v is not None}
    msg = pb2.GenerateRequest(attention=attention, request_id=request_id, sampling=pb2.SamplingParams(**sampling))
    if use_ids:
        msg.token_ids.ids.extend(ids)
    else:
        msg.text = text
    return msg


_lock = threading.Lock()  # one example at a time: request ids drawn twice must not collide in flight


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(MESSAGES)
def test_any_request_message_gets_an_answer_or_a_client_error(gateway: Gateway, msg: pb2.GenerateRequest) -> None:
    """Whatever the message: a result, or INVALID_ARGUMENT with the field named - never INTERNAL,
    UNKNOWN or a hang - and nothing is left in flight."""
    with _lock:
        try:
            out = gateway.stub.Complete(msg, timeout=60)
        except grpc.RpcError as e:
            event(f"refused: {(e.details() or '').split(':', 1)[0]}")
            assert e.code() == INVALID, (e.code(), e.details())
            field = (e.details() or "").split(":", 1)[0]
            assert field in {"prompt", "prompt.text", "prompt.token_ids", "request_id", "attention"} or \
                field.startswith("sampling."), e.details()
        else:
            event("answered")
            assert out.finish_reason != pb2.FINISH_REASON_UNSPECIFIED
            assert 1 <= len(out.token_ids) <= max(msg.sampling.max_tokens, 16)
        stats = _idle(gateway)
        assert stats["requests_in_flight"] == 0
