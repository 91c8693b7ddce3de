"""The indexer's recall: how much of the dense attention the selected top-k positions cover.

For windows of held-out text of N tokens, the last `queries` positions of each: the dense
attention distribution over the earlier positions, averaged over every cross layer and head, and
the share of it that falls on the indexer's top-k positions (the paper reports ~80% at k = 2,048
of 32K). Reported by k, next to what k random positions would cover (k / position count).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from services.engine.model import CLSAModel
from services.train.distill import dense_attention_average, indexer_scores


@dataclass(frozen=True)
class RecallCell:
    length: int
    k: int
    windows: int
    queries: int
    recall: float  # mean share of the dense attention mass on the top-k
    random: float  # what k uniformly chosen earlier positions would cover, on average

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@torch.inference_mode()
def run_recall(model: CLSAModel, data: bytes, lengths: list[int], ks: list[int], windows: int,
               queries: int = 64) -> list[RecallCell]:
    if model.shared is None:
        raise ValueError("recall needs a YOCO model (it has an indexer)")
    device = next(model.parameters()).device
    cells = []
    for length in lengths:
        need = windows * length
        if len(data) < need:
            raise ValueError(f"{windows} windows of {length} bytes need {need} bytes of text, got {len(data)}")
        tokens = torch.tensor(list(data[:need]), dtype=torch.long, device=device).view(windows, length)
        _, inputs = model.forward_train(tokens, collect=True)  # type: ignore[misc]
        rows = torch.arange(max(0, length - queries), length, device=device)
        target = dense_attention_average(inputs, model.sm_scale, rows)  # [W, Q, N]
        scores = indexer_scores(model, inputs.boundary, rows)
        visible = (rows + 1).float()  # positions a query may attend to
        for k in ks:
            top = scores.topk(min(k, length), dim=-1).indices
            covered = target.gather(-1, top).sum(-1)  # -inf scores past the query carry no mass
            cells.append(RecallCell(length, k, windows, len(rows), float(covered.mean()),
                                    float((k / visible).clamp(max=1.0).mean())))
    return cells


def format_table(cells: list[RecallCell]) -> str:
    lines = [f"{'length':>8} {'k':>7} {'recall':>8} {'random':>8}"]
    for c in cells:
        lines.append(f"{c.length:>8} {c.k:>7} {c.recall:>8.1%} {c.random:>8.1%}")
    return "\n".join(lines)
