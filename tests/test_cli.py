"""The `clsa` command as a user runs it: a real subprocess of the installed console script."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

CLSA = str(Path(sys.executable).parent / "clsa")


def clsa(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CLSA, *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("attention", ["clsa", "dense"])
def test_generate_json(attention: str) -> None:
    proc = clsa("generate", "--model", "clsa-tiny", "--prompt", "hello", "--json", "--attention", attention,
                "--max-tokens", "8")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["prompt_tokens"] == 5
    assert len(out["token_ids"]) == 8 and out["finish_reason"] == "length"
    assert isinstance(out["text"], str) and out["attention"] == attention


def test_init_writes_a_checkpoint_that_generates_like_the_preset(tmp_path: Path) -> None:
    proc = clsa("init", "--preset", "clsa-tiny", "--out", str(tmp_path / "ckpt"), "--seed", "0")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "ckpt" / "model.safetensors").is_file() and (tmp_path / "ckpt" / "config.json").is_file()
    args = ("--prompt", "The pass key is", "--json", "--max-tokens", "6", "--temperature", "0.8", "--seed", "4")
    from_dir = json.loads(clsa("generate", "--model", str(tmp_path / "ckpt"), *args).stdout)
    from_preset = json.loads(clsa("generate", "--model", "clsa-tiny", *args).stdout)
    assert from_dir["token_ids"] == from_preset["token_ids"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--prompt", ""), "prompt: is empty"),
        (("--prompt", "hi", "--temperature", "-1"), "temperature: must be a finite number >= 0"),
        (("--prompt", "hi", "--top-p", "0"), "top_p: must be in (0, 1]"),
        (("--prompt", "hi", "--max-tokens", "0"), "max_tokens: must be an integer >= 1"),
        (("--prompt", "hi", "--model", "/nonexistent"), "neither a preset"),
    ],
)
def test_generate_bad_input_is_a_clear_error(args: tuple[str, ...], message: str) -> None:
    proc = clsa("generate", *args)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr
