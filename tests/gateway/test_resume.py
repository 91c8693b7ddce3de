"""How a resumed decode stream is joined to what the client already has (`ray_backend._Rejoin`):
the resumed worker makes again, delta by delta, the tokens and text already streamed; those are
dropped, the rest passed on, and a stream that would contradict what was streamed ends the
request instead."""

from __future__ import annotations

import pytest

from services.engine import RequestOutput
from services.engine.sequence import FinishReason
from services.gateway.backend import BackendUnavailable
from services.gateway.ray_backend import _Rejoin

# The client has had tokens 1 2 3 ("abc"); token 1 ("a") came with the prefill, in the bundle.
SENT_IDS, SENT_TEXT = [1, 2, 3], "abc"


def out(ids: list[int], text: str, finished: bool = False) -> RequestOutput:
    """A decode step's output: its new tokens and text (the whole output on the finished one)."""
    return RequestOutput(request_id="r", prompt_tokens=3, token_ids=[], new_token_ids=ids, text="",
                         text_delta=text, finish_reason=FinishReason.LENGTH if finished else None)


def rejoin() -> _Rejoin:
    return _Rejoin(SENT_IDS, SENT_TEXT, 1, 1, "d0", "d1")


def test_the_tokens_made_again_are_dropped_and_the_new_ones_passed_on() -> None:
    join = rejoin()
    assert join(out([2], "b")) is None
    assert join(out([3], "c")) is None
    nxt = join(out([4], "d"))
    assert nxt is not None and (nxt.new_token_ids, nxt.text_delta) == ([4], "d")
    nxt = join(out([5], "e"))
    assert nxt is not None and (nxt.new_token_ids, nxt.text_delta) == ([5], "e")


def test_a_delta_that_straddles_what_was_sent_passes_on_its_new_part() -> None:
    join = rejoin()
    nxt = join(out([2, 3, 4], "bcd"))  # (a worker's step makes one token; the join does not assume it)
    assert nxt is not None and (nxt.new_token_ids, nxt.text_delta) == ([4], "d")


def test_text_held_back_by_a_stop_string_is_caught_up_later() -> None:
    join = rejoin()
    assert join(out([2], "")) is None  # its text held back
    nxt = join(out([3, 4], "bcd"))
    assert nxt is not None and (nxt.new_token_ids, nxt.text_delta) == ([4], "d")


def test_a_resumed_stream_that_ends_where_the_client_is_ends_it_with_nothing_new() -> None:
    join = rejoin()
    assert join(out([2], "b")) is None
    last = join(out([3], "c", finished=True))
    assert last is not None and last.finished and last.new_token_ids == [] and last.text_delta == ""


@pytest.mark.parametrize(("deltas", "words"), [
    ([([9], "?")], "differ from those already streamed at token 1"),
    ([([2], "b"), ([7], "c")], "differ from those already streamed at token 2"),
    ([([2], "b", True)], "differ from those already streamed at token 2"),
    ([([2], "b"), ([3], "X")], "text differs"),
    ([([2], "b"), ([3], "", True)], "text differs"),
])
def test_a_resumed_stream_that_contradicts_the_client_ends_the_request(deltas: list[tuple], words: str) -> None:
    join = rejoin()
    with pytest.raises(BackendUnavailable, match=words):
        for delta in deltas:
            join(out(*delta))
