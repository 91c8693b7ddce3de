"""proto <-> engine dataclasses, and the validation of every request at the edge.

Every error is an InvalidRequestError naming the field as the client spells it (`sampling.top_p`,
`prompt.token_ids`), so the gateway can answer INVALID_ARGUMENT before any worker sees the request.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from types import ModuleType
from typing import Any, Literal

from services.engine.errors import InvalidRequestError
from services.engine.sampling import SamplingParams
from services.engine.sequence import FinishReason

MAX_REQUEST_ID_CHARS = 128
DEFAULTS = SamplingParams()


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt: str | tuple[int, ...]
    params: SamplingParams
    attention: Literal["clsa", "dense"] | None  # None: the model's default
    prompt_tokens: int | None = None  # counted once at the edge (check_limits); None where no one has


def request_from_proto(pb2: ModuleType, msg: Any, vocab_size: int) -> GenerationRequest:
    """A validated GenerationRequest from a clsa.v1.GenerateRequest."""
    request_id = msg.request_id
    if len(request_id) > MAX_REQUEST_ID_CHARS or not request_id.isprintable():
        raise InvalidRequestError("request_id", f"must be at most {MAX_REQUEST_ID_CHARS} printable characters")
    return GenerationRequest(request_id=request_id, prompt=_prompt(msg, vocab_size),
                             params=sampling_from_proto(msg.sampling if msg.HasField("sampling") else None),
                             attention=_attention(pb2, msg.attention))


def check_limits(request: GenerationRequest, vocab_size: int, max_seq_len: int,
                 count_tokens: Callable[[str], int]) -> GenerationRequest:
    """What the model's sizes forbid, refused at the edge too: a prompt that leaves no room to
    generate, more new tokens than any sequence can hold, stop token ids outside the vocabulary.
    Returns the request with its prompt's token count, so that no one downstream counts again."""
    n = prompt_tokens(request, count_tokens)
    if n >= max_seq_len:
        raise InvalidRequestError("prompt", f"{n} tokens leave no room to generate: the model's max_seq_len is "
                                            f"{max_seq_len}")
    if request.params.max_tokens > max_seq_len:
        raise InvalidRequestError("sampling.max_tokens", f"at most {max_seq_len} (the model's max_seq_len), "
                                                         f"got {request.params.max_tokens}")
    bad = next((t for t in request.params.stop_token_ids if t >= vocab_size), None)
    if bad is not None:
        raise InvalidRequestError("sampling.stop_token_ids", f"token id {bad} outside the vocabulary [0, {vocab_size})")
    return replace(request, prompt_tokens=n)


def prompt_tokens(request: GenerationRequest, count_tokens: Callable[[str], int]) -> int:
    """The prompt's length in tokens: as counted at the edge, else counted now."""
    if request.prompt_tokens is not None:
        return request.prompt_tokens
    return len(request.prompt) if isinstance(request.prompt, tuple) else count_tokens(request.prompt)


def _prompt(msg: Any, vocab_size: int) -> str | tuple[int, ...]:
    which = msg.WhichOneof("prompt")
    if which is None:
        raise InvalidRequestError("prompt", "set text or token_ids")
    if which == "text":
        if not msg.text:
            raise InvalidRequestError("prompt.text", "is empty")
        return str(msg.text)
    ids = tuple(msg.token_ids.ids)
    if not ids:
        raise InvalidRequestError("prompt.token_ids", "is empty")
    bad = next((i for i in ids if i >= vocab_size), None)
    if bad is not None:
        raise InvalidRequestError("prompt.token_ids", f"token id {bad} outside the vocabulary [0, {vocab_size})")
    return ids


def _attention(pb2: ModuleType, value: int) -> Literal["clsa", "dense"] | None:
    if value == pb2.ATTENTION_MODE_UNSPECIFIED:
        return None
    if value == pb2.ATTENTION_MODE_CLSA:
        return "clsa"
    if value == pb2.ATTENTION_MODE_DENSE:
        return "dense"
    raise InvalidRequestError("attention", f"unknown AttentionMode value {value}")


def sampling_from_proto(msg: Any | None) -> SamplingParams:
    """SamplingParams from a clsa.v1.SamplingParams (unset optional fields take the defaults)."""
    if msg is None:
        return DEFAULTS

    def pick(name: str) -> Any:
        return getattr(msg, name) if msg.HasField(name) else getattr(DEFAULTS, name)

    try:
        # float32 on the wire: NaN and inf arrive as such and are refused by SamplingParams.
        return SamplingParams(
            max_tokens=pick("max_tokens"), temperature=_finite_or_same(pick("temperature")),
            top_p=_finite_or_same(pick("top_p")), top_k=pick("top_k"),
            seed=msg.seed if msg.HasField("seed") else None, stop=tuple(msg.stop),
            stop_token_ids=tuple(msg.stop_token_ids), ignore_eos=msg.ignore_eos,
        )
    except InvalidRequestError as e:
        raise InvalidRequestError(f"sampling.{e.param}", str(e).split(": ", 1)[1]) from None


def _finite_or_same(x: float) -> float:
    # float32 values such as 0.9 arrive as 0.8999999761581421; round them back when finite.
    return float(f"{x:.7g}") if math.isfinite(x) else x


FINISH_TO_PROTO = {FinishReason.LENGTH: "FINISH_REASON_LENGTH", FinishReason.STOP: "FINISH_REASON_STOP",
                   FinishReason.EOS: "FINISH_REASON_EOS"}


def finish_reason_to_proto(pb2: ModuleType, reason: FinishReason | None) -> int:
    if reason is None or reason not in FINISH_TO_PROTO:
        return int(pb2.FINISH_REASON_UNSPECIFIED)
    return int(getattr(pb2, FINISH_TO_PROTO[reason]))
