"""Training text: a byte corpus mixed with synthetic long-context retrieval.

The corpus is Python's standard library sources (on every machine) or the files a user points at.
Every 20th file is held out (`split_files`), so the ppl eval can read text training never saw.
Each training sample is `seq_len + 1` bytes of one of three kinds:

- plain: a random stretch of the corpus;
- pass-key: the eval's own format (services/evals/passkey.py) - instruction, filler (corpus text or
  the classic sentences), the key line at a random depth, more filler, the question - and the
  answer, so that the sample ends with the key;
- key-value: 1-8 lines "The value of key K is V." hidden at random depths of corpus text, then
  "What is the value of key K? The value of key K is V." for 1-4 of them (more answers per sample:
  retrieval is a sparse signal in 8K bytes of text).

Retrieval samples carry a weight per target byte: `answer_weight` on the answer's bytes, 1 elsewhere.
Samples are a pure function of (seed, step, index), so a resumed run sees the same data.
"""

from __future__ import annotations

import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from services.evals.passkey import CLASSIC_FILLER, passkey_prompt

TEXT_SUFFIXES = (".py", ".txt", ".md", ".rst")
HELD_OUT_EVERY = 20
SAMPLED_FILE_LIMIT = 1 << 20


def stdlib_files() -> list[Path]:
    """Python's standard library sources, sorted (site-packages excluded)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and p.is_file())


def expand_paths(paths: list[str]) -> list[Path]:
    """Files, and the text files under directories, sorted; raises ValueError when none are found."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found += [p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES]
        elif path.is_file():
            found.append(path)
        else:
            raise ValueError(f"corpus path {raw!r} does not exist")
    if not found:
        raise ValueError(f"no text files ({', '.join(TEXT_SUFFIXES)}) under {paths}")
    return sorted(found)


def split_files(files: list[Path]) -> tuple[list[Path], list[Path]]:
    """(training files, held-out files): every HELD_OUT_EVERY-th file is held out."""
    held = files[HELD_OUT_EVERY - 1::HELD_OUT_EVERY]
    held_set = set(held)
    return [f for f in files if f not in held_set], held


def read_text(files: list[Path], max_bytes: int) -> bytes:
    """The files' bytes, joined by blank lines, up to max_bytes. When the files hold more than
    that, every n-th file is read, so that a large tree (a whole site-packages) is sampled across
    its packages rather than cut after the first ones in sorted order, and files over
    SAMPLED_FILE_LIMIT (data tables, word lists) are left out; when those fall short of max_bytes
    (a few large files), the files skipped are read after them, in order."""
    total = sum(path.stat().st_size + 2 for path in files)
    if total > max_bytes:
        sampled = [path for path in files[::-(-total // max_bytes)] if path.stat().st_size <= SAMPLED_FILE_LIMIT]
        chosen = set(sampled)
        files = sampled + [path for path in files if path not in chosen]
    out = bytearray()
    for path in files:
        out += path.read_bytes() + b"\n\n"
        if len(out) >= max_bytes:
            break
    return bytes(out[:max_bytes])


def training_text(paths: list[str] | None, max_bytes: int) -> bytes:
    files = expand_paths(paths) if paths else stdlib_files()
    train, _ = split_files(files) if len(files) >= HELD_OUT_EVERY else (files, [])
    return read_text(train, max_bytes)


def held_out_text(paths: list[str] | None, max_bytes: int) -> bytes:
    files = expand_paths(paths) if paths else stdlib_files()
    _, held = split_files(files)
    return read_text(held or files, max_bytes)


@dataclass(frozen=True)
class Sample:
    tokens: list[int]  # seq_len + 1 bytes
    weights: list[float]  # seq_len: the weight of predicting tokens[i + 1]
    kind: str


class Mixer:
    """Samples of `seq_len + 1` bytes: plain text, pass-key or key-value retrieval."""

    def __init__(self, text: bytes, seq_len: int, passkey_frac: float, kv_frac: float,
                 answer_weight: float = 1.0) -> None:
        if len(text) < 2 * (seq_len + 1):
            raise ValueError(f"the corpus has {len(text)} bytes; samples of {seq_len + 1} need at least twice that")
        if passkey_frac < 0 or kv_frac < 0 or passkey_frac + kv_frac > 1:
            raise ValueError(f"passkey_frac {passkey_frac} and kv_frac {kv_frac} must be >= 0 and sum to <= 1")
        if seq_len < 256 and passkey_frac + kv_frac > 0:
            raise ValueError(f"retrieval samples need seq_len >= 256, got {seq_len}")
        self.text = text.decode("latin-1")  # one character per byte
        self.seq_len = seq_len
        self.passkey_frac = passkey_frac
        self.kv_frac = kv_frac
        self.answer_weight = answer_weight

    def sample(self, rng: random.Random) -> Sample:
        draw = rng.random()
        if draw < self.passkey_frac:
            return self._passkey(rng)
        if draw < self.passkey_frac + self.kv_frac:
            return self._key_value(rng)
        return self._finish(self._slice(rng, self.seq_len + 1), "", "plain")

    def _slice(self, rng: random.Random, n: int) -> str:
        start = rng.randrange(0, len(self.text) - n)
        return self.text[start:start + n]

    def _passkey(self, rng: random.Random) -> Sample:
        key = rng.randrange(10_000, 100_000)
        answer = f" {key}."
        n = self.seq_len + 1 - len(answer)
        filler = CLASSIC_FILLER if rng.random() < 0.5 else self._slice(rng, n)
        return self._finish(passkey_prompt(n, rng.random(), key, filler), answer, "passkey")

    def _key_value(self, rng: random.Random) -> Sample:
        pairs = [(f"{rng.randrange(16**6):06x}", rng.randrange(10_000, 100_000)) for _ in range(rng.randint(1, 8))]
        asked = rng.sample(pairs, rng.randint(1, min(len(pairs), 4)))
        lines = [f"\nThe value of key {k} is {v}.\n" for k, v in pairs]
        questions = [(f"\nWhat is the value of key {k}? The value of key {k} is", f" {v}.") for k, v in asked]
        n_filler = self.seq_len + 1 - sum(len(line) for line in lines) - sum(len(q) + len(a) for q, a in questions)
        if n_filler < 0:  # short samples: fewer questions
            return self._key_value(rng) if len(pairs) > 1 else self._finish(self._slice(rng, self.seq_len + 1),
                                                                             "", "plain")
        filler = self._slice(rng, n_filler)
        cuts = sorted(rng.randrange(0, n_filler + 1) for _ in lines)
        parts, last = [], 0
        for cut, line in zip(cuts, lines):
            parts += [filler[last:cut], line]
            last = cut
        body = "".join(parts) + filler[last:]
        for question, answer in questions[:-1]:
            body += question + answer  # each answer weighed too (below)
        question, answer = questions[-1]
        return self._finish(body + question, answer, "kv", earlier=[a for _, a in questions[:-1]])

    def _finish(self, prompt: str, answer: str, kind: str, earlier: list[str] | None = None) -> Sample:
        """The sample `prompt + answer`, the answer's bytes weighted; `earlier` answers (key-value
        samples ask several questions) are found right after each "... is" of the prompt's tail."""
        text = (prompt + answer).encode("latin-1", errors="replace")
        if len(text) != self.seq_len + 1:
            raise AssertionError(f"{kind} sample of {len(text)} bytes, want {self.seq_len + 1}")
        weights = [1.0] * self.seq_len
        spans = [(self.seq_len - len(answer), self.seq_len)]
        if earlier:
            end = len(prompt)
            for previous in reversed(earlier):
                start = prompt.rindex(previous, 0, end)
                spans.append((start - 1, start - 1 + len(previous)))  # weight i predicts byte i + 1
                end = start
        for start, stop in spans:
            for i in range(start, stop):
                weights[i] = self.answer_weight
        return Sample(list(text), weights, kind)


def batch_rng(seed: int, step: int, index: int) -> random.Random:
    """The generator of sample `index` of step `step`: data is a pure function of (seed, step)."""
    return random.Random(hash((seed, step, index)) & 0xFFFF_FFFF_FFFF)
