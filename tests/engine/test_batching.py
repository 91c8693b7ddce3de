"""Continuous batching: what a request gets does not depend on what it shares a batch with."""

from __future__ import annotations

import pytest
import torch

from services.engine import SamplingParams
from tests.conftest import make_engine, variant
from tests.helpers import GREEDY, random_prompt, record_logits, run_requests

LENGTHS = [3, 11, 26, 7, 1, 40]


@pytest.mark.parametrize("cfg_name", ["yoco", "transformer"])
def test_batch_of_different_lengths_decodes_as_each_alone(cfg_name: str) -> None:
    cfg = variant(arch="transformer") if cfg_name == "transformer" else variant()
    attention = "dense" if cfg_name == "transformer" else "clsa"
    prompts = [random_prompt(n, seed=n) for n in LENGTHS]
    engine = make_engine(cfg)
    log = record_logits(engine)
    batched = run_requests(engine, [(p, GREEDY, attention) for p in prompts])
    for prompt, out in zip(prompts, batched):
        alone_engine = make_engine(cfg)
        alone_log = record_logits(alone_engine)
        [alone] = run_requests(alone_engine, [(prompt, GREEDY, attention)])
        assert out.token_ids == alone.token_ids
        torch.testing.assert_close(torch.stack(log[out.request_id]), torch.stack(alone_log[alone.request_id]),
                                   atol=1e-4, rtol=1e-4)


def test_seeded_sampling_is_independent_of_the_batch() -> None:
    prompts = [random_prompt(n, seed=n) for n in LENGTHS]
    params = [SamplingParams(max_tokens=10, temperature=0.9, top_p=0.95, top_k=50, seed=100 + i, ignore_eos=True)
              for i in range(len(prompts))]
    batched = run_requests(make_engine(), [(p, sp, "clsa") for p, sp in zip(prompts, params)])
    for prompt, sp, out in zip(prompts, params, batched):
        [alone] = run_requests(make_engine(), [(prompt, sp, "clsa")])
        assert out.token_ids == alone.token_ids


def test_mixed_attention_modes_in_one_batch() -> None:
    prompts = [random_prompt(n, seed=n) for n in LENGTHS]
    modes = ["clsa", "dense"] * 3
    engine = make_engine()
    log = record_logits(engine)
    batched = run_requests(engine, [(p, GREEDY, m) for p, m in zip(prompts, modes)])
    for prompt, mode, out in zip(prompts, modes, batched):
        alone_engine = make_engine()
        alone_log = record_logits(alone_engine)
        [alone] = run_requests(alone_engine, [(prompt, GREEDY, mode)])
        torch.testing.assert_close(torch.stack(log[out.request_id]), torch.stack(alone_log[alone.request_id]),
                                   atol=1e-4, rtol=1e-4)


def test_requests_beyond_max_num_seqs_wait_and_all_finish() -> None:
    engine = make_engine(max_num_seqs=2)
    prompts = [random_prompt(n, seed=n) for n in LENGTHS]
    outs = run_requests(engine, [(p, GREEDY, None) for p in prompts])
    assert [len(o.token_ids) for o in outs] == [GREEDY.max_tokens] * len(prompts)
    assert engine.cache.blocks.num_used == 0 and engine.cache.slots.num_used == 0


def test_prefill_token_budget_admits_prompts_a_few_at_a_time_with_the_same_tokens() -> None:
    """max_prefill_tokens: a prefill step takes in at most that many prompt tokens (a longer prompt
    alone), and what each request gets is unchanged."""
    prompts = [random_prompt(n, seed=n) for n in LENGTHS]  # 3, 11, 26, 7, 1, 40 tokens
    want = run_requests(make_engine(), [(p, GREEDY, "clsa") for p in prompts])
    engine = make_engine(max_prefill_tokens=20)
    admitted: list[list[int]] = []
    prefill = engine.runner.prefill

    def counting(seqs):  # noqa: ANN001, ANN202
        admitted.append([len(s.prompt_ids) for s in seqs])
        return prefill(seqs)

    engine.runner.prefill = counting  # type: ignore[method-assign]
    got = run_requests(engine, [(p, GREEDY, "clsa") for p in prompts])
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert admitted == [[3, 11], [26], [7, 1], [40]]


def test_prefill_token_budget_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_prefill_tokens must be >= 1"):
        make_engine(max_prefill_tokens=0)
