"""The checkpoint the repository ships (models/clsa-small): it loads, it is the default, it retrieves.

It was trained and distilled on an H200 (models/clsa-small/TRAINING.md, docs/quality.md); here, on
the CPU, it must still answer a pass-key prompt with its key in both attention modes - in CLSA at
the paper's k = N/16, where the key line lies far outside the 128-token sliding window and only
the indexer's selection can reach it.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from services.cli import DEFAULT_MODEL
from services.engine import EngineConfig, LLMEngine, SamplingParams
from services.engine.checkpoint import load_checkpoint
from services.engine.config import preset
from services.evals.passkey import answer_is_right, passkey_prompt

SHIPPED = Path(DEFAULT_MODEL)
CLSA = str(Path(sys.executable).parent / "clsa")


@pytest.fixture(scope="module")
def engine() -> LLMEngine:
    return LLMEngine.from_model(str(SHIPPED), EngineConfig(max_num_seqs=2, index_topk=1024 // 16))


def test_the_shipped_checkpoint_is_clsa_small_under_40_mb_with_its_record() -> None:
    assert SHIPPED.parts[-2:] == ("models", "clsa-small")
    assert (SHIPPED / "model.safetensors").stat().st_size < 40 * 10**6
    model = load_checkpoint(SHIPPED)  # verifies the weights against their fingerprint
    assert model.cfg == preset("clsa-small")
    record = (SHIPPED / "TRAINING.md").read_text()
    assert "indexer distillation" in record and "H200" in record


@pytest.mark.parametrize("attention", ["dense", "clsa"])
def test_the_shipped_model_finds_the_pass_key(engine: LLMEngine, attention: str) -> None:
    rng = random.Random(7)
    keys = [rng.randrange(10_000, 100_000) for _ in range(2)]
    prompts = [passkey_prompt(1024, depth, key) for depth, key in zip((0.2, 0.7), keys)]
    outs = engine.generate(prompts, SamplingParams(max_tokens=7, temperature=0.0), attention=attention)
    assert engine.index_topk == 64  # CLSA reads 64 of ~1,000 positions
    assert [answer_is_right(o.text, key) for o, key in zip(outs, keys)] == [True, True], [o.text for o in outs]


def test_clsa_generate_uses_the_shipped_model_by_default() -> None:
    key = 31415
    prompt = passkey_prompt(600, 0.3, key)
    proc = subprocess.run([CLSA, "generate", "--prompt", prompt, "--max-tokens", "7", "--json"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert answer_is_right(out["text"], key), out["text"]
