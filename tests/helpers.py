"""Test helpers: record the logits the engine samples from, per request."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

from services.engine import LLMEngine, RequestOutput, SamplingParams
from services.engine.sequence import Sequence

T = TypeVar("T")


def run_in_threads(fn: Callable[[], T], n: int) -> list[T]:
    """Call fn from n threads at once; their results, the first error re-raised."""
    with ThreadPoolExecutor(max_workers=n) as pool:
        futures = [pool.submit(fn) for _ in range(n)]
        return [f.result() for f in futures]


def record_logits(engine: LLMEngine) -> dict[str, list[torch.Tensor]]:
    """Wrap the runner so every logits row it returns is kept under its request id."""
    log: dict[str, list[torch.Tensor]] = defaultdict(list)

    def wrap(fn: Callable[[list[Sequence]], torch.Tensor]) -> Callable[[list[Sequence]], torch.Tensor]:
        def recording(seqs: list[Sequence]) -> torch.Tensor:
            logits = fn(seqs)
            for seq, row in zip(seqs, logits):
                log[seq.request_id].append(row.float().clone())
            return logits
        return recording

    engine.runner.prefill = wrap(engine.runner.prefill)  # type: ignore[method-assign]
    engine.runner.decode = wrap(engine.runner.decode)  # type: ignore[method-assign]
    return log


def run_requests(engine: LLMEngine, requests: list[tuple[list[int] | str, SamplingParams, str | None]]
                 ) -> list[RequestOutput]:
    """Queue every (prompt, params, attention) at once and run to completion; outputs in order."""
    ids = [engine.add_request(p, params, attention) for p, params, attention in requests]
    final: dict[str, RequestOutput] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
    return [final[i] for i in ids]


def random_prompt(length: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (length,), generator=gen).tolist()


GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
