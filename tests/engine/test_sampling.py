"""Sampling and stopping rules as a caller sees them."""

from __future__ import annotations

import collections

import pytest
import torch

from services.engine import FinishReason, LLMEngine, SamplingParams
from services.engine.sampling import Sampler
from services.engine.sequence import Sequence
from services.engine.tokenizer import ByteTokenizer, IncrementalDetokenizer
from tests.conftest import make_engine, make_model
from tests.helpers import random_prompt, run_requests

PROMPT = random_prompt(20, seed=5)


def _draws(logits: list[float], params: SamplingParams, n: int = 3000) -> collections.Counter[int]:
    sampler = Sampler(torch.device("cpu"), seed=0)
    batch = torch.tensor([logits] * n)
    return collections.Counter(sampler.sample(batch, [params] * n, [None] * n))


def test_temperature_sampling_follows_the_softmax() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    counts = _draws(probs.log().tolist(), SamplingParams(temperature=1.0))
    for token, p in enumerate(probs.tolist()):
        assert abs(counts[token] / 3000 - p) < 0.035


def test_top_k_and_top_p_cut_the_tail() -> None:
    logits = torch.tensor([0.4, 0.3, 0.2, 0.1]).log().tolist()
    assert set(_draws(logits, SamplingParams(top_k=2))) == {0, 1}
    # mass before token 1 is 0.4 < 0.5 (kept); before token 2 it is 0.7 (dropped)
    assert set(_draws(logits, SamplingParams(top_p=0.5))) == {0, 1}
    assert set(_draws(logits, SamplingParams(top_p=0.3))) == {0}


def test_greedy_limits_agree() -> None:
    greedy = run_requests(make_engine(), [(PROMPT, SamplingParams(max_tokens=8, temperature=0.0), None)])[0]
    for params in (SamplingParams(max_tokens=8, top_k=1, seed=3), SamplingParams(max_tokens=8, top_p=1e-6, seed=3)):
        assert run_requests(make_engine(), [(PROMPT, params, None)])[0].token_ids == greedy.token_ids


def test_seed_reproduces_and_different_seeds_differ() -> None:
    def run(seed: int) -> list[int]:
        params = SamplingParams(max_tokens=24, temperature=1.5, seed=seed, ignore_eos=True)
        return run_requests(make_engine(), [(PROMPT, params, None)])[0].token_ids

    assert run(1) == run(1)
    assert run(1) != run(2)


def _sampled(params: SamplingParams, engine: LLMEngine | None = None) -> tuple[list[int], str, FinishReason]:
    out = run_requests(engine or make_engine(), [(PROMPT, params, None)])[0]
    assert out.finish_reason is not None
    return out.token_ids, out.text, out.finish_reason


def test_stop_string_ends_generation_and_is_not_returned() -> None:
    base = SamplingParams(max_tokens=40, temperature=1.5, seed=11, ignore_eos=True)
    ids, text, reason = _sampled(base)
    assert reason is FinishReason.LENGTH and len(ids) == 40
    stop = text[10:12]
    first = text.find(stop)
    ids2, text2, reason2 = _sampled(SamplingParams(**{**base.__dict__, "stop": (stop,)}))
    assert reason2 is FinishReason.STOP
    assert text2 == text[:first]
    assert ids2 == ids[: len(ids2)] and len(ids2) < len(ids)


def test_stop_token_id_and_eos() -> None:
    base = SamplingParams(max_tokens=40, temperature=1.5, seed=11, ignore_eos=True)
    ids, _, _ = _sampled(base)
    target = ids[7]
    first = ids.index(target)
    ids2, _, reason = _sampled(SamplingParams(**{**base.__dict__, "stop_token_ids": (target,)}))
    assert reason is FinishReason.STOP and ids2 == ids[: first + 1]

    class EosTokenizer(ByteTokenizer):
        eos_token_id = target

    eos_engine = LLMEngine(make_model(), EosTokenizer(), make_engine().config)
    ids3, _, reason3 = _sampled(SamplingParams(**{**base.__dict__, "ignore_eos": False}), eos_engine)
    assert reason3 is FinishReason.EOS and ids3 == ids[: first + 1]
    ids4, _, reason4 = _sampled(base, eos_engine)  # ignore_eos
    assert reason4 is FinishReason.LENGTH and ids4 == ids


def test_stop_string_split_across_tokens_and_held_back_while_streaming() -> None:
    tok = ByteTokenizer()
    params = SamplingParams(max_tokens=100, stop=("lo w",))
    seq = Sequence.create("r", tok.encode("> "), params, True, 1000, tok, None)
    streamed = ""
    for token in tok.encode("hello world"):
        seq.append(token)
        streamed += seq.take_text_delta()
        assert "lo w"[:2] not in streamed or seq.finish_reason is not None
        if seq.finish_reason:
            break
    assert seq.finish_reason is FinishReason.STOP
    assert seq.text == streamed == "hel"


@pytest.mark.parametrize("stop", [(), ("zz", "a long stop")])
def test_a_long_stream_keeps_only_its_held_back_tail_unjoined(stop: tuple[str, ...]) -> None:
    """Each token costs its delta, not a copy of the text so far: past what is streamed, the
    sequence holds only the characters a stop string could still begin with."""
    tok = ByteTokenizer()
    seq = Sequence.create("r", tok.encode("> "), SamplingParams(max_tokens=10**6, stop=stop), True, 10**7, tok, None)
    body = "lorem ipsum dolor sit amet " * 400
    streamed = []
    for token in tok.encode(body):
        seq.append(token)
        streamed.append(seq.take_text_delta())
        assert len(seq._pending) <= max(map(len, stop), default=1) - 1
    assert seq.finish_reason is None
    assert "".join(streamed) + seq._pending == seq.text == body


def test_multibyte_characters_are_never_split() -> None:
    tok = ByteTokenizer()
    detok = IncrementalDetokenizer(tok, [])
    pieces = [detok.push(b) for b in "naïve 日本".encode()]
    assert "".join(pieces) + detok.flush() == "naïve 日本"
    assert all("\ufffd" not in p for p in pieces)


def test_detokenizer_releases_runs_without_text_and_keeps_its_window_bounded() -> None:
    """Ids without text (past the byte range) or invalid bytes are held at most MAX_PENDING
    tokens: the text is still exact, and each push decodes a bounded window."""
    tok = ByteTokenizer()
    detok = IncrementalDetokenizer(tok, [])
    ids = [300] * 500 + [0xFF] * 50 + list("ok ü".encode()) + [0xFF] * 3
    pieces = [detok.push(i) for i in ids]
    assert "".join(pieces) + detok.flush() == tok.decode(ids) == "\ufffd" * 50 + "ok ü" + "\ufffd" * 3
    assert "ü" in "".join(pieces)  # a whole character, not two replacement marks
    assert len(detok._ids) - detok._prefix <= 2 * IncrementalDetokenizer.MAX_PENDING
