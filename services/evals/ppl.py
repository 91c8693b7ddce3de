"""Bits per byte on held-out text, DENSE vs CLSA, by context length.

Each window of N + 1 bytes is scored in one whole-sequence pass (`forward_full`, the same masks
decode uses): every position predicts the next byte with all (DENSE) or the indexer's top-k (CLSA)
earlier positions in the cross layers. Byte-level models only, so tokens are bytes.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from services.engine.model import CLSAModel
from services.engine.tokenizer import ByteTokenizer, Tokenizer


def stdlib_text(max_bytes: int) -> bytes:
    """Held-out text on every machine: the standard library files `clsa train` never trains on."""
    from services.train.data import held_out_text

    return held_out_text(None, max_bytes)


@dataclass(frozen=True)
class PplCell:
    length: int
    mode: str  # "dense" or "clsa@k"
    index_topk: int | None
    windows: int
    bits_per_byte: float

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@torch.inference_mode()
def bits_per_byte(model: CLSAModel, data: bytes, length: int, windows: int, attention: str,
                  index_topk: int | None) -> float:
    """Mean next-byte cross-entropy in bits over `windows` disjoint windows of `length` + 1 bytes."""
    need = windows * (length + 1)
    if len(data) < need:
        raise ValueError(f"{windows} windows of {length + 1} bytes need {need} bytes of text, got {len(data)}")
    device = next(model.parameters()).device
    tokens = torch.tensor(list(data[:need]), dtype=torch.long, device=device).view(windows, length + 1)
    logits = model.forward_full(tokens[:, :-1], attention, index_topk)  # type: ignore[arg-type]
    nll = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
    return float(nll) / math.log(2)


def run_ppl(model: CLSAModel, tokenizer: Tokenizer, data: bytes, lengths: list[int], windows: int,
            fixed_topk: int | None = None) -> list[PplCell]:
    """DENSE, CLSA at k = N/16 and, if given, CLSA at a fixed k, for every length."""
    if not isinstance(tokenizer, ByteTokenizer):
        raise ValueError("the ppl eval scores bytes: it needs a byte-level model")
    cells = []
    for length in lengths:
        modes: list[tuple[str, int | None]] = [("dense", None), (f"clsa@{max(1, length // 16)}", max(1, length // 16))]
        if fixed_topk is not None and fixed_topk != max(1, length // 16):
            modes.append((f"clsa@{fixed_topk}", fixed_topk))
        for name, k in modes:
            bpb = bits_per_byte(model, data, length, windows, "dense" if k is None else "clsa", k)
            cells.append(PplCell(length, name, k, windows, bpb))
    return cells


def format_table(cells: list[PplCell]) -> str:
    """Bits per byte by length (rows) and mode (columns), and CLSA at N/16 against DENSE in %;
    "-" where a mode was not run (the fixed k equal to N/16)."""
    def column(c: PplCell) -> str:
        return "clsa@N/16" if c.index_topk == max(1, c.length // 16) else c.mode

    columns = list(dict.fromkeys(column(c) for c in cells))
    lines = [f"{'length':>8} " + " ".join(f"{m:>12}" for m in columns) + f" {'N/16 vs dense':>14}   bits per byte"]
    for length in sorted({c.length for c in cells}):
        values = {column(c): c.bits_per_byte for c in cells if c.length == length}
        row = " ".join(f"{values[m]:>12.4f}" if m in values else f"{'-':>12}" for m in columns)
        gap = (f"{100 * (values['clsa@N/16'] / values['dense'] - 1):>+13.2f}%"
               if "dense" in values and "clsa@N/16" in values else f"{'-':>14}")
        lines.append(f"{length:>8} {row} {gap}")
    return "\n".join(lines)
