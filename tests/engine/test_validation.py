"""Bad input is refused with a message that names the parameter at fault."""

from __future__ import annotations

import pytest
import torch

from services.engine import EngineConfig, InvalidRequestError, ModelConfig, SamplingParams
from tests.conftest import make_engine, variant


@pytest.mark.parametrize(
    ("kwargs", "param", "message"),
    [
        ({"temperature": -0.5}, "temperature", "must be a finite number >= 0"),
        ({"temperature": float("nan")}, "temperature", "finite"),
        ({"top_p": 0.0}, "top_p", r"must be in \(0, 1\]"),
        ({"top_p": 1.5}, "top_p", r"must be in \(0, 1\]"),
        ({"top_p": float("inf")}, "top_p", r"\(0, 1\]"),
        ({"max_tokens": 0}, "max_tokens", "must be an integer >= 1"),
        ({"max_tokens": -3}, "max_tokens", ">= 1"),
        ({"top_k": -1}, "top_k", ">= 0"),
        ({"seed": -1}, "seed", r"\[0, 2\^63\)"),
        ({"stop": ("",)}, "stop", "1-256 characters"),
        ({"stop": "x"}, "stop", "must be a sequence"),
        ({"stop": ("s",) * 65}, "stop", "at most 64"),
        ({"stop_token_ids": (-1,)}, "stop_token_ids", "token ids >= 0"),
    ],
)
def test_bad_sampling_params(kwargs: dict, param: str, message: str) -> None:
    with pytest.raises(InvalidRequestError, match=f"^{param}: .*{message}") as err:
        SamplingParams(**kwargs)
    assert err.value.param == param


def test_empty_prompt() -> None:
    engine = make_engine()
    for prompt in ("", []):
        with pytest.raises(InvalidRequestError, match="^prompt: is empty"):
            engine.add_request(prompt)


def test_prompt_over_max_seq_len() -> None:
    engine = make_engine(variant(max_seq_len=32))
    with pytest.raises(InvalidRequestError, match="^prompt: has 32 tokens; the model's max_seq_len is 32"):
        engine.add_request("x" * 32)
    engine.add_request("x" * 31)  # one token of room is enough


def test_generation_stops_at_max_seq_len() -> None:
    engine = make_engine(variant(max_seq_len=32))
    out = engine.generate(["x" * 28], SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True))[0]
    assert len(out.token_ids) == 4 and out.finish_reason.value == "length"


def test_token_ids_outside_the_vocabulary() -> None:
    engine = make_engine()
    with pytest.raises(InvalidRequestError, match=r"^prompt: token id 259 outside the vocabulary \[0, 259\)"):
        engine.add_request([1, 2, 259])
    with pytest.raises(InvalidRequestError, match="token id -1"):
        engine.add_request([-1])


def test_attention_mode() -> None:
    with pytest.raises(InvalidRequestError, match="^attention: must be 'clsa' or 'dense'"):
        make_engine().add_request("hi", attention="sparse")  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match="^attention: 'clsa' needs a YOCO model"):
        make_engine(variant(arch="transformer")).add_request("hi", attention="clsa")


def test_duplicate_request_id_in_flight() -> None:
    engine = make_engine()
    engine.add_request("hi", request_id="a")
    with pytest.raises(InvalidRequestError, match="^request_id: 'a' is already in flight"):
        engine.add_request("hi", request_id="a")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"n_layers": 3}, "n_layers must be even"),
        ({"n_heads": 6, "n_kv_heads": 4}, "multiple of n_kv_heads"),
        ({"arch": "rnn"}, "arch must be"),
        ({"eos_token_id": 999}, "eos_token_id 999 outside the vocabulary"),
        ({"head_dim": 15}, "head_dim must be even"),
    ],
)
def test_bad_model_config(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ModelConfig(**{**variant().to_dict(), **changes})


def test_kv_pool_from_free_memory_needs_a_gpu() -> None:
    """kv_cache_bytes=None sizes the pool from free GPU memory; a CPU model is told to give a size."""
    with pytest.raises(ValueError, match="free GPU memory.*give kv_cache_bytes or num_blocks"):
        make_engine(num_blocks=None, kv_cache_bytes=None)
    assert make_engine(num_blocks=5, kv_cache_bytes=None).cache.num_blocks == 5  # an explicit count wins
    with pytest.raises(ValueError, match="kv_cache_bytes must be >= 1"):
        make_engine(kv_cache_bytes=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="sizes the pool from a CUDA device's free memory")
def test_kv_pool_from_free_memory_takes_its_share_of_the_gpu_and_serves() -> None:
    from services.engine.engine import KV_FREE_FRACTION, LLMEngine, free_device_bytes
    from services.engine.tokenizer import ByteTokenizer
    from tests.conftest import make_model

    model = make_model().to("cuda")
    budget = free_device_bytes(torch.device("cuda"))
    block_size = 1024
    engine = LLMEngine(model, ByteTokenizer(), EngineConfig(block_size=block_size, num_blocks=None,
                                                            kv_cache_bytes=None, max_num_seqs=4))
    pool = engine.cache.num_blocks * model.cfg.kv_bytes_per_token(4) * block_size
    assert 0.9 * budget <= pool <= budget / KV_FREE_FRACTION  # the share of what was free, no more
    [out] = engine.generate(["hello"], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    assert len(out.token_ids) == 4
    del engine
    torch.cuda.empty_cache()
