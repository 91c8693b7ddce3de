"""Bits per byte, DENSE vs CLSA, on text every machine has."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from services.engine.checkpoint import random_model
from services.engine.tokenizer import ByteTokenizer
from services.evals.ppl import bits_per_byte, format_table, run_ppl, stdlib_text


def test_stdlib_text_is_deterministic_text() -> None:
    data = stdlib_text(5000)
    assert len(data) == 5000 and data == stdlib_text(5000)
    assert b"import" in data


def test_clsa_equals_dense_when_k_covers_every_position_and_differs_below() -> None:
    model = random_model("clsa-tiny")
    data = stdlib_text(4 * 257)
    dense = bits_per_byte(model, data, 256, 4, "dense", None)
    assert 0 < dense < 16 and math.isfinite(dense)
    assert bits_per_byte(model, data, 256, 4, "clsa", 256) == pytest.approx(dense, rel=1e-5)
    assert bits_per_byte(model, data, 256, 4, "clsa", 4) != pytest.approx(dense, rel=1e-5)


def test_run_table_and_errors() -> None:
    model = random_model("clsa-tiny")
    cells = run_ppl(model, ByteTokenizer(), stdlib_text(3 * 129), [64, 128], 3, fixed_topk=8)
    assert [(c.length, c.mode) for c in cells] == [(64, "dense"), (64, "clsa@4"), (64, "clsa@8"),
                                                  (128, "dense"), (128, "clsa@8")]
    assert format_table(cells).splitlines()[0].split()[:4] == ["length", "dense", "clsa@N/16", "clsa@8"]
    with pytest.raises(ValueError, match="need 1300 bytes"):
        bits_per_byte(model, b"x" * 100, 129, 10, "dense", None)


def test_cli(tmp_path: Path) -> None:
    out = tmp_path / "ppl.json"
    proc = subprocess.run([str(Path(sys.executable).parent / "clsa"), "eval", "ppl", "--model", "clsa-tiny",
                           "--lengths", "128", "--trials", "2", "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert [c["mode"] for c in json.loads(out.read_text())["cells"]] == ["dense", "clsa@8"]
