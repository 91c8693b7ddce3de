"""How a resumed decode stream is joined to what the client already has (`_continue_after`): the
tokens made again are dropped, the rest passed on, and a stream that would contradict what was
streamed ends the request instead."""

from __future__ import annotations

import pytest

from services.engine import RequestOutput
from services.engine.sequence import FinishReason
from services.gateway.backend import BackendUnavailable
from services.gateway.ray_backend import _continue_after


def out(tokens: list[int], text: str, finished: bool = False) -> RequestOutput:
    return RequestOutput(request_id="r", prompt_tokens=3, token_ids=tokens, new_token_ids=tokens[-1:], text=text,
                         text_delta=text[-1:], finish_reason=FinishReason.LENGTH if finished else None)


SENT = out([1, 2, 3], "abc")


def test_the_tokens_made_again_are_dropped_and_the_new_ones_passed_on() -> None:
    assert _continue_after(SENT, out([1, 2], "ab"), "d0", "d1") is None
    assert _continue_after(SENT, out([1, 2, 3], "abc"), "d0", "d1") is None
    assert _continue_after(SENT, out([1, 2, 3, 7], "abcx"), "d0", "d1") is not None  # the same tokens and more
    nxt = _continue_after(SENT, out([1, 2, 3, 4, 5], "abcde"), "d0", "d1")
    assert nxt is not None and (nxt.new_token_ids, nxt.text_delta, nxt.token_ids) == ([4, 5], "de", [1, 2, 3, 4, 5])
    last = _continue_after(SENT, out([1, 2, 3], "abc", finished=True), "d0", "d1")
    assert last is not None and last.finished and last.new_token_ids == [] and last.text_delta == ""


@pytest.mark.parametrize(("resumed", "words"), [
    (out([1, 9], "a?"), "differ from those already streamed at token 1"),
    (out([1, 2], "ab", finished=True), "differ from those already streamed at token 2"),
    (out([1, 2, 3, 4], "abXd"), "text differs"),
])
def test_a_resumed_stream_that_contradicts_the_client_ends_the_request(resumed: RequestOutput, words: str) -> None:
    with pytest.raises(BackendUnavailable, match=words):
        _continue_after(SENT, resumed, "clsa-decode-0", "clsa-decode-1")
