"""Which sequences run next: first come, first served, admitted while blocks and slots last.

A step either prefills the sequences just admitted or decodes every running one. A prefill step
takes in at most `max_prefill_tokens` prompt tokens (a longer prompt runs alone), so long prompts
are prefilled a few at a time instead of all in one batch.
"""

from __future__ import annotations

from collections import deque
from typing import Literal

from services.engine.block_manager import BlockManager
from services.engine.sequence import Sequence, SequenceStatus

StepKind = Literal["prefill", "decode", "idle"]


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_prefill_tokens: int | None = None) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def schedule(self) -> tuple[StepKind, list[Sequence]]:
        admitted: list[Sequence] = []
        budget = self.max_prefill_tokens
        while (self.waiting and len(self.running) + len(admitted) < self.max_num_seqs
               and self.block_manager.can_admit(self.waiting[0])):
            if budget is not None and admitted and len(self.waiting[0].prompt_ids) > budget:
                break
            seq = self.waiting.popleft()
            if budget is not None:
                budget -= len(seq.prompt_ids)
            self.block_manager.admit(seq)
            seq.status = SequenceStatus.RUNNING
            admitted.append(seq)
        if admitted:
            self.running.extend(admitted)
            return "prefill", admitted
        if self.running:
            return "decode", list(self.running)
        return "idle", []

    def finish(self, seq: Sequence) -> None:
        """Release what `seq` holds and drop it from the queues (idempotent)."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.release(seq)
        seq.status = SequenceStatus.FINISHED
