"""The pass-key eval: prompts in the standard format, scoring, and the DENSE/CLSA table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from services.engine import LLMEngine
from services.evals.passkey import (
    CLASSIC_FILLER,
    INSTRUCTION,
    QUESTION,
    answer_is_right,
    format_depth_table,
    format_table,
    key_line,
    passkey_prompt,
    run_passkey,
)


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 1.0])
def test_prompt_has_the_standard_parts_at_the_requested_depth(depth: float) -> None:
    prompt = passkey_prompt(2000, depth, 71432)
    assert prompt.startswith(INSTRUCTION) and prompt.endswith(QUESTION)
    assert abs(len(prompt) - 2000) <= len(CLASSIC_FILLER)
    where = prompt.index(key_line(71432))
    filler_span = len(prompt) - len(INSTRUCTION) - len(key_line(71432)) - len(QUESTION)
    relative = (where - len(INSTRUCTION)) / filler_span
    assert abs(relative - depth) < 0.05
    assert "The grass is green." in prompt and prompt.count("71432") == 2


def test_scoring_takes_the_first_number() -> None:
    assert answer_is_right(" 71432. Remember", 71432)
    assert not answer_is_right(" 71433", 71432)
    assert not answer_is_right(" is it 1 or 71432", 71432)
    assert not answer_is_right("ooooo", 71432)


def test_bad_depth_and_length_are_refused() -> None:
    with pytest.raises(ValueError, match="depth"):
        passkey_prompt(2000, 1.5, 12345)
    with pytest.raises(ValueError, match="too short"):
        passkey_prompt(50, 0.5, 12345)


def test_run_reports_every_cell_for_dense_and_both_clsa_ks() -> None:
    engine = LLMEngine.from_model("clsa-tiny")
    cells = run_passkey(engine, lengths=[400, 600], depths=[0.0, 1.0], trials=2, fixed_topk=16, max_tokens=4)
    assert len(cells) == 2 * 2 * 3
    assert {c.mode for c in cells} == {"dense", "clsa@25", "clsa@37", "clsa@16"}
    assert all(c.trials == 2 and 0 <= c.correct <= 2 for c in cells)
    table = format_table(cells)
    assert table.splitlines()[0].split() == ["length", "dense", "clsa@N/16", "clsa@16"]
    assert [line.split()[0] for line in table.splitlines()[1:]] == ["400", "600"]
    by_depth = format_depth_table(cells).splitlines()
    assert len(by_depth) == 3 * 3 and by_depth[0].split() == ["dense", "by", "depth", "0.00", "1.00"]


def test_cli_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "passkey.json"
    proc = subprocess.run([str(Path(sys.executable).parent / "clsa"), "eval", "passkey", "--model", "clsa-tiny",
                           "--lengths", "300", "--depths", "0.5", "--trials", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "clsa@N/16" in proc.stdout
    data = json.loads(out.read_text())
    assert [c["mode"] for c in data["cells"]] == ["dense", "clsa@18"] and data["fingerprint"]


def test_real_text_filler_varies_per_prompt_and_must_be_long_enough() -> None:
    engine = LLMEngine.from_model("clsa-tiny")
    text = "".join(f"line {i} of some real text.\n" for i in range(200))
    cells = run_passkey(engine, lengths=[400], depths=[0.5], trials=2, max_tokens=2, text=text)
    assert [c.mode for c in cells] == ["dense", "clsa@25"] and all(c.trials == 2 for c in cells)
    with pytest.raises(ValueError, match="filler text"):
        run_passkey(engine, lengths=[4000], depths=[0.5], trials=1, text=text)
