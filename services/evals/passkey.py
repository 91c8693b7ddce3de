"""The pass-key retrieval eval: find a 5-digit key hidden at a chosen depth of long filler text.

The prompt is the standard format: an instruction line, filler, the line "The pass key is NNNNN.
Remember it. NNNNN is the pass key." at `depth` (0 = start, 1 = end of the filler), more filler,
then "What is the pass key? The pass key is". The answer is the greedy continuation; a trial
passes when its first five digits are the key. Each (length, depth) cell runs DENSE and CLSA on
the same prompts and weights. The filler is the classic sentences or, with `text`, real text.
"""

from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass

from services.engine import EngineConfig, LLMEngine, SamplingParams

INSTRUCTION = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
               "I will quiz you about the important information there.\n")
CLASSIC_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
QUESTION = "\nWhat is the pass key? The pass key is"


def key_line(key: int) -> str:
    return f"\nThe pass key is {key}. Remember it. {key} is the pass key.\n"


def passkey_prompt(n_chars: int, depth: float, key: int, filler: str = CLASSIC_FILLER) -> str:
    """A prompt of about `n_chars` characters (bytes, for the byte-level tokenizer) with the key
    line at `depth` of the filler."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    budget = n_chars - len(INSTRUCTION) - len(key_line(key)) - len(QUESTION)
    if budget < 0:
        raise ValueError(f"n_chars {n_chars} is too short for the prompt's fixed parts")
    text = (filler * (budget // len(filler) + 1))[:budget]
    # Cut the filler at a sentence boundary near the requested depth.
    cut = int(budget * depth)
    boundary = text.rfind(". ", 0, cut)
    cut = 0 if depth == 0 else (boundary + 2 if boundary >= 0 else cut)
    return INSTRUCTION + text[:cut] + key_line(key) + text[cut:] + QUESTION


def answer_is_right(completion: str, key: int) -> bool:
    digits = re.findall(r"\d+", completion)
    return bool(digits) and digits[0] == str(key)


@dataclass(frozen=True)
class PasskeyCell:
    length: int
    depth: float
    mode: str  # "dense" or "clsa@k"
    index_topk: int | None
    trials: int
    correct: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.trials if self.trials else 0.0

    def to_dict(self) -> dict[str, object]:
        return {**asdict(self), "accuracy": self.accuracy}


def run_passkey(engine: LLMEngine, lengths: list[int], depths: list[float], trials: int, seed: int = 0,
                fixed_topk: int | None = None, max_tokens: int = 8, text: str | None = None) -> list[PasskeyCell]:
    """DENSE, CLSA at k = N/16 (the paper's ratio) and, if given, CLSA at a fixed k, per cell.
    The engines share `engine`'s weights; each k gets its own engine configuration. Filler: the
    classic sentences, or - given `text` - a stretch of it from a random offset per prompt."""
    if text is not None and len(text) < 2 * max(lengths):
        raise ValueError(f"filler text of {len(text)} characters; lengths up to {max(lengths)} need twice that")
    rng = random.Random(seed)

    def filler() -> str:
        if text is None:
            return CLASSIC_FILLER
        start = rng.randrange(0, len(text) - length)
        return text[start:start + length]

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    cells = []
    for length in lengths:
        modes: list[tuple[str, int | None]] = [("dense", None), (f"clsa@{max(1, length // 16)}", max(1, length // 16))]
        if fixed_topk is not None and fixed_topk != max(1, length // 16):
            modes.append((f"clsa@{fixed_topk}", fixed_topk))
        for depth in depths:
            keys = [rng.randrange(10_000, 100_000) for _ in range(trials)]
            prompts = [passkey_prompt(length, depth, key, filler()) for key in keys]
            for name, k in modes:
                runner = _engine_with_topk(engine, k)
                outs = runner.generate(prompts, params, attention="dense" if k is None else "clsa")
                correct = sum(answer_is_right(o.text, key) for o, key in zip(outs, keys))
                cells.append(PasskeyCell(length, depth, name, k, trials, correct))
    return cells


def _engine_with_topk(engine: LLMEngine, k: int | None) -> LLMEngine:
    if k is None or k == engine.index_topk:
        return engine
    config = EngineConfig(**{**engine.config.__dict__, "index_topk": k})
    return LLMEngine(engine.model, engine.tokenizer, config)


def format_table(cells: list[PasskeyCell]) -> str:
    """Accuracy by length (rows) and mode (columns), over all depths."""
    columns = list(dict.fromkeys(_column(c) for c in cells))
    lines = [f"{'length':>8} " + " ".join(f"{m:>12}" for m in columns)]
    for length in sorted({c.length for c in cells}):
        row = []
        for column in columns:
            mine = [c for c in cells if c.length == length and _column(c) == column]
            total = sum(c.trials for c in mine)
            row.append(f"{sum(c.correct for c in mine) / total:>12.1%}" if total else f"{'-':>12}")
        lines.append(f"{length:>8} " + " ".join(row))
    return "\n".join(lines)


def format_depth_table(cells: list[PasskeyCell]) -> str:
    """Accuracy by length (rows) and depth of the key (columns), one block per mode column."""
    depths = sorted({c.depth for c in cells})
    lines = []
    for column in dict.fromkeys(_column(c) for c in cells):
        lines.append(f"{column + ' by depth':>20} " + " ".join(f"{d:>7.2f}" for d in depths))
        for length in sorted({c.length for c in cells}):
            mine = {c.depth: c for c in cells if c.length == length and _column(c) == column}
            lines.append(f"{length:>20} " + " ".join(
                f"{mine[d].accuracy:>7.0%}" if d in mine else f"{'-':>7}" for d in depths))
    return "\n".join(lines)


def _column(cell: PasskeyCell) -> str:
    """CLSA at the paper's ratio is one column across lengths (its k varies with N)."""
    if cell.index_topk is not None and cell.index_topk == max(1, cell.length // 16):
        return "clsa@N/16"
    return cell.mode
