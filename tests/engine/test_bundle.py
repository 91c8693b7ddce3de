"""Disaggregation inside the engine: prefill on one engine, decode on another, same tokens."""

from __future__ import annotations

import pytest

from services.engine import InvalidRequestError, LLMEngine, OutOfBlocksError, SamplingParams
from tests.conftest import make_engine, variant
from tests.helpers import random_prompt, run_requests


def _pair(cfg_name: str = "yoco", seed: int = 0, **engine_kwargs: object) -> tuple[LLMEngine, LLMEngine]:
    cfg = variant(arch="transformer") if cfg_name == "transformer" else variant()
    # The same seed gives the same weights: two engines of one model (one fingerprint).
    return make_engine(cfg, seed, **engine_kwargs), make_engine(cfg, seed, **engine_kwargs)


def _disaggregated(prefill: LLMEngine, decode: LLMEngine, prompt: list[int], params: SamplingParams,
                   attention: str) -> list[int]:
    first, bundle = prefill.prefill_to_bundle(prompt, params, attention)  # type: ignore[arg-type]
    assert prefill.cache.blocks.num_used == 0  # the prefill side keeps nothing
    if bundle is None:
        return first.token_ids
    rid = decode.add_bundle(bundle, params, attention)  # type: ignore[arg-type]
    tokens = list(first.new_token_ids)
    while decode.has_unfinished_requests():
        for out in decode.step():
            assert out.request_id == rid
            tokens.extend(out.new_token_ids)
    return tokens


@pytest.mark.parametrize("prompt_len", [1, 9, 30])
@pytest.mark.parametrize(("cfg_name", "attention"), [("yoco", "clsa"), ("yoco", "dense"), ("transformer", "dense")])
@pytest.mark.parametrize("params", [SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True),
                                    SamplingParams(max_tokens=10, temperature=1.2, seed=3, ignore_eos=True)],
                         ids=["greedy", "seeded"])
def test_prefill_here_decode_there_equals_one_engine(cfg_name: str, attention: str, prompt_len: int,
                                                     params: SamplingParams) -> None:
    prompt = random_prompt(prompt_len, seed=prompt_len)
    prefill, decode = _pair(cfg_name)
    [alone] = run_requests(make_engine(variant(arch="transformer") if cfg_name == "transformer" else variant()),
                           [(prompt, params, attention)])
    assert _disaggregated(prefill, decode, prompt, params, attention) == alone.token_ids
    assert decode.cache.blocks.num_used == 0 and decode.cache.slots.num_used == 0


def test_bundle_carries_the_global_cache_rows_and_the_ring() -> None:
    prefill, _ = _pair()
    _, bundle = prefill.prefill_to_bundle(random_prompt(21, seed=0), SamplingParams(max_tokens=4))
    assert bundle is not None and bundle.n_tokens == 21
    cfg = prefill.model_config
    assert tuple(bundle.k.shape) == (1, 21, cfg.n_kv_heads, cfg.head_dim)  # one shared K/V for every cross layer
    assert tuple(bundle.k_idx.shape) == (21, cfg.index_dim)  # the indexer keys travel with it
    assert tuple(bundle.swa_k.shape) == (cfg.n_self_layers, cfg.swa_window, cfg.n_kv_heads, cfg.head_dim)
    paged = sum(t.numel() * t.element_size() for t in (bundle.k, bundle.v, bundle.k_idx))
    assert paged == 21 * prefill.cache.bytes_per_token
    assert bundle.fingerprint == prefill.fingerprint


def test_a_bundle_of_another_model_is_refused() -> None:
    prefill = make_engine(seed=0)
    other = make_engine(seed=1)
    assert prefill.fingerprint != other.fingerprint
    _, bundle = prefill.prefill_to_bundle(random_prompt(12, seed=0), SamplingParams(max_tokens=4))
    assert bundle is not None
    with pytest.raises(InvalidRequestError, match=r"^bundle: made by model test-0, this engine serves test-1"):
        other.add_bundle(bundle, SamplingParams(max_tokens=4))
    assert other.cache.blocks.num_used == 0 and not other.has_unfinished_requests()


def test_first_token_that_finishes_needs_no_bundle() -> None:
    prefill, _ = _pair()
    out, bundle = prefill.prefill_to_bundle(random_prompt(5, seed=0), SamplingParams(max_tokens=1))
    assert bundle is None and out.finished and len(out.token_ids) == 1


def test_decode_side_without_room_says_so_and_keeps_nothing() -> None:
    prefill, decode = _pair(num_blocks=16)  # 64 tokens
    params = SamplingParams(max_tokens=30, ignore_eos=True, temperature=0.0)
    _, first = prefill.prefill_to_bundle(random_prompt(30, seed=1), params)
    _, second = prefill.prefill_to_bundle(random_prompt(30, seed=2), params)
    assert first is not None and second is not None
    decode.add_bundle(first, params)
    with pytest.raises(OutOfBlocksError, match="no room now"):
        decode.add_bundle(second, params)
    assert decode.cache.blocks.num_used == 8  # only the first one's 30 tokens (blocks of 4)
    while decode.has_unfinished_requests():
        decode.step()
    decode.add_bundle(second, params)  # room again
    assert decode.cache.blocks.num_used == 8
