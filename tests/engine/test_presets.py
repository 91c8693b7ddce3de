"""The presets the project knows by name exist at the sizes DESIGN.md gives, and all of them run."""

from __future__ import annotations

import pytest
import torch

from services.engine import PRESETS, EngineConfig, LLMEngine, SamplingParams
from services.engine.checkpoint import random_model
from services.engine.model import CLSAModel
from services.engine.tokenizer import ByteTokenizer


def _n_params(name: str) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in CLSAModel(PRESETS[name]).parameters())


def test_preset_sizes() -> None:
    assert 2e6 < _n_params("clsa-tiny") < 6e6
    # 16 SWA + 16 cross layers (cross layers carry no K/V projection) vs 32 full layers.
    assert 3.0e9 < _n_params("clsa-4b") < _n_params("transformer-4b") < 4.5e9
    big = PRESETS["clsa-4b"]
    assert (big.n_layers, big.d_model, big.n_heads, big.n_kv_heads, big.head_dim, big.ffn_dim) == \
        (32, 3072, 24, 8, 128, 8192)
    assert PRESETS["transformer-4b"].n_kv_caches == 32 and big.n_kv_caches == 1


@pytest.mark.parametrize(("name", "modes"), [("clsa-4b", ["clsa", "dense"]), ("transformer-4b", ["dense"])])
def test_4b_presets_run_on_cpu(name: str, modes: list[str]) -> None:
    model = random_model(name, dtype=torch.bfloat16)
    engine = LLMEngine(model, ByteTokenizer(), EngineConfig(kv_cache_bytes=64 << 20, max_num_seqs=2))
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    outs = [engine.generate(["long-context serving"], params, attention=m)[0] for m in modes]  # type: ignore[arg-type]
    for out in outs:
        assert len(out.token_ids) == 3 and all(0 <= t < model.cfg.vocab_size for t in out.token_ids)
    # a 20-token prompt is shorter than k = 2048: both modes agree
    assert all(o.token_ids == outs[0].token_ids for o in outs)
