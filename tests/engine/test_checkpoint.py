"""Checkpoints round-trip exactly, carry a fingerprint, and refuse what does not fit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from services.engine import CheckpointError, LLMEngine
from services.engine.checkpoint import fingerprint, load_checkpoint, random_model, save_checkpoint
from tests.conftest import make_model, variant
from tests.helpers import GREEDY, random_prompt, run_requests


def test_round_trip_gives_identical_outputs(tmp_path: Path) -> None:
    model = make_model()
    fp = save_checkpoint(model, tmp_path)
    loaded = load_checkpoint(tmp_path)
    assert loaded.cfg == model.cfg
    assert loaded.fingerprint == fp == fingerprint(model)
    prompt = random_prompt(25, seed=0)
    before = run_requests(LLMEngine(model, _tok()), [(prompt, GREEDY, "clsa")])[0]
    after = run_requests(LLMEngine.from_model(str(tmp_path)), [(prompt, GREEDY, "clsa")])[0]
    assert before.token_ids == after.token_ids


def test_fingerprint_changes_with_weights_and_config() -> None:
    a, b = make_model(seed=0), make_model(seed=1)
    assert fingerprint(a) != fingerprint(b)
    assert fingerprint(a) == fingerprint(make_model(seed=0))
    assert fingerprint(make_model(variant(cross_rope=True))) != fingerprint(a)


def test_checkpoint_of_another_config_is_refused(tmp_path: Path) -> None:
    save_checkpoint(make_model(), tmp_path)
    other = variant(d_model=96).to_dict()
    (tmp_path / "config.json").write_text(json.dumps(other))
    with pytest.raises(CheckpointError, match="checkpoint of another config"):
        load_checkpoint(tmp_path)


def test_config_change_that_keeps_shapes_is_caught_by_the_fingerprint(tmp_path: Path) -> None:
    save_checkpoint(make_model(), tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(variant(swa_window=16).to_dict()))
    with pytest.raises(CheckpointError, match="recorded fingerprint"):
        load_checkpoint(tmp_path)


def test_tampered_or_missing_weights_are_refused(tmp_path: Path) -> None:
    save_checkpoint(make_model(), tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    meta = {"fingerprint": fingerprint(make_model())}
    tensors["embed.weight"][0, 0] += 1.0
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError, match="recorded fingerprint"):
        load_checkpoint(tmp_path)
    del tensors["norm.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError, match=r"missing \['norm.weight'\]"):
        load_checkpoint(tmp_path)


def test_not_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no config.json"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="neither a preset"):
        LLMEngine.from_model(str(tmp_path / "nope"))


def test_hf_tokenizer_json_is_used_when_present(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "hello": 1, "world": 2}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    model = random_model("clsa-tiny")
    save_checkpoint(model, tmp_path)
    tok.save(str(tmp_path / "tokenizer.json"))
    engine = LLMEngine.from_model(str(tmp_path))
    assert engine.tokenizer.encode("hello world") == [1, 2]


def _tok():  # noqa: ANN202
    from services.engine.tokenizer import ByteTokenizer

    return ByteTokenizer()


def test_a_bf16_checkpoint_is_half_the_size_and_keeps_its_fingerprint(tmp_path: Path) -> None:
    model = make_model()
    fp32_fp = save_checkpoint(model, tmp_path / "fp32")
    bf16_fp = save_checkpoint(model, tmp_path / "bf16", dtype=torch.bfloat16)
    assert bf16_fp != fp32_fp
    sizes = [(tmp_path / d / "model.safetensors").stat().st_size for d in ("fp32", "bf16")]
    assert sizes[1] < 0.55 * sizes[0]
    loaded = load_checkpoint(tmp_path / "bf16")  # runs in fp32, identified by the weights as stored
    assert loaded.fingerprint == bf16_fp
    assert next(loaded.parameters()).dtype == torch.float32
    torch.testing.assert_close(loaded.embed.weight, model.embed.weight.to(torch.bfloat16).float())


def test_the_tokenizer_of_a_spec_without_its_weights(tmp_path: Path) -> None:
    from services.cli import DEFAULT_MODEL
    from services.engine.checkpoint import load_tokenizer_for
    from services.engine.errors import CheckpointError

    assert load_tokenizer_for("clsa-tiny").encode("hé") == [104, 195, 169]
    assert load_tokenizer_for(DEFAULT_MODEL).encode("ab") == [97, 98]  # the shipped model is byte-level
    with pytest.raises(CheckpointError, match="config.json"):
        load_tokenizer_for(str(tmp_path))
