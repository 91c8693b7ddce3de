"""The public proto and its conversion at the edge: every bad field named, nothing let through."""

from __future__ import annotations

import pytest

from services.api.stubs import load
from services.engine import InvalidRequestError, SamplingParams
from services.engine.sequence import FinishReason
from services.gateway.convert import finish_reason_to_proto, request_from_proto

pb2, pb2_grpc = load()
VOCAB = 259


def test_service_and_messages_are_the_documented_contract() -> None:
    service = pb2.DESCRIPTOR.services_by_name["Generation"]
    assert service.full_name == "clsa.v1.Generation"
    methods = {m.name: (m.input_type.name, m.output_type.name, m.server_streaming) for m in service.methods}
    assert methods == {
        "Generate": ("GenerateRequest", "GenerateResponse", True),
        "Complete": ("GenerateRequest", "GenerateResponse", False),
        "Tokenize": ("TokenizeRequest", "TokenizeResponse", False),
        "GetModelInfo": ("GetModelInfoRequest", "ModelInfo", False),
    }
    assert pb2.AttentionMode.Name(0) == "ATTENTION_MODE_UNSPECIFIED"
    assert pb2.FinishReason.Name(0) == "FINISH_REASON_UNSPECIFIED"
    assert hasattr(pb2_grpc, "GenerationServicer") and hasattr(pb2_grpc, "GenerationStub")


def test_a_good_request_converts_with_defaults() -> None:
    msg = pb2.GenerateRequest(request_id="r1", text="hello",
                              sampling=pb2.SamplingParams(max_tokens=8, top_p=0.9, seed=3, stop=["\n"]),
                              attention=pb2.ATTENTION_MODE_DENSE)
    req = request_from_proto(pb2, pb2.GenerateRequest.FromString(msg.SerializeToString()), VOCAB)
    assert req.prompt == "hello" and req.attention == "dense" and req.request_id == "r1"
    assert req.params == SamplingParams(max_tokens=8, temperature=1.0, top_p=0.9, seed=3, stop=("\n",))
    bare = request_from_proto(pb2, pb2.GenerateRequest(token_ids=pb2.TokenIds(ids=[1, 2, 258])), VOCAB)
    assert bare.prompt == (1, 2, 258) and bare.params == SamplingParams() and bare.attention is None
    greedy = request_from_proto(pb2, pb2.GenerateRequest(text="x", sampling=pb2.SamplingParams(temperature=0)),
                                VOCAB)
    assert greedy.params.is_greedy  # an explicit 0 is not "unset"


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    ("fields", "param", "message"),
    [
        ({}, "prompt", "set text or token_ids"),
        ({"text": ""}, "prompt.text", "is empty"),  # a oneof member has presence, even when empty
        ({"token_ids": pb2.TokenIds(ids=[])}, "prompt.token_ids", "is empty"),
        ({"token_ids": pb2.TokenIds(ids=[1, 259])}, "prompt.token_ids", "token id 259 outside"),
        ({"text": "x", "attention": 7}, "attention", "unknown AttentionMode value 7"),
        ({"text": "x", "request_id": "r" * 129}, "request_id", "at most 128"),
        ({"text": "x", "request_id": "a\nb"}, "request_id", "printable"),
        ({"text": "x", "sampling": pb2.SamplingParams(max_tokens=0)}, "sampling.max_tokens", ">= 1"),
        ({"text": "x", "sampling": pb2.SamplingParams(temperature=-1)}, "sampling.temperature", ">= 0"),
        ({"text": "x", "sampling": pb2.SamplingParams(temperature=NAN)}, "sampling.temperature", "finite"),
        ({"text": "x", "sampling": pb2.SamplingParams(temperature=INF)}, "sampling.temperature", "finite"),
        ({"text": "x", "sampling": pb2.SamplingParams(top_p=0)}, "sampling.top_p", r"\(0, 1\]"),
        ({"text": "x", "sampling": pb2.SamplingParams(top_p=1.5)}, "sampling.top_p", r"\(0, 1\]"),
        ({"text": "x", "sampling": pb2.SamplingParams(top_p=NAN)}, "sampling.top_p", r"\(0, 1\]"),
        ({"text": "x", "sampling": pb2.SamplingParams(stop=[""])}, "sampling.stop", "1-256 characters"),
        ({"text": "x", "sampling": pb2.SamplingParams(stop=["s"] * 10_000)}, "sampling.stop", "at most 64"),
        ({"text": "x", "sampling": pb2.SamplingParams(seed=2**63)}, "sampling.seed", r"\[0, 2\^63\)"),
    ],
)
def test_bad_requests_name_the_field(fields: dict, param: str, message: str) -> None:
    msg = pb2.GenerateRequest(**fields)
    with pytest.raises(InvalidRequestError, match=f"^{param}: .*{message}") as err:
        request_from_proto(pb2, msg, VOCAB)
    assert err.value.param == param


def test_finish_reasons_map_to_the_proto_enum() -> None:
    assert finish_reason_to_proto(pb2, None) == pb2.FINISH_REASON_UNSPECIFIED
    assert finish_reason_to_proto(pb2, FinishReason.LENGTH) == pb2.FINISH_REASON_LENGTH
    assert finish_reason_to_proto(pb2, FinishReason.STOP) == pb2.FINISH_REASON_STOP
    assert finish_reason_to_proto(pb2, FinishReason.EOS) == pb2.FINISH_REASON_EOS
