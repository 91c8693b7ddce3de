"""One request's life inside the engine, and the stopping rules.

States: WAITING (queued, holds nothing) -> RUNNING (holds KV blocks and a ring-buffer slot) ->
FINISHED (all released). `finish_reason` says why it ended.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from services.engine.sampling import SamplingParams
from services.engine.tokenizer import IncrementalDetokenizer, Tokenizer


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(enum.Enum):
    LENGTH = "length"  # max_tokens reached, or the model's max_seq_len
    STOP = "stop"  # a stop string or stop token id
    EOS = "eos"
    ABORT = "abort"  # cancelled by the caller


@dataclass
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    sparse: bool  # CLSA (True) or DENSE attention in the cross layers
    max_total_tokens: int  # prompt + the most tokens it may still generate (capped by max_seq_len)
    eos_token_id: int
    detokenizer: IncrementalDetokenizer
    generator: torch.Generator | None = None
    output_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    block_ids: list[int] = field(default_factory=list)
    reserved_blocks: int = 0
    slot: int = -1
    # The text so far is the pieces already handed out by `take_text_delta` (final: a stop string
    # can only cut text that is still held back) and the text after them, a few characters long.
    # So a token costs O(its delta), not a copy of the whole text (a str attribute's += copies).
    _streamed: list[str] = field(default_factory=list)
    _pending: str = ""

    @classmethod
    def create(cls, request_id: str, prompt_ids: list[int], params: SamplingParams, sparse: bool,
               max_seq_len: int, tokenizer: Tokenizer, generator: torch.Generator | None) -> Sequence:
        return cls(
            request_id=request_id, prompt_ids=prompt_ids, params=params, sparse=sparse,
            max_total_tokens=min(len(prompt_ids) + params.max_tokens, max_seq_len),
            eos_token_id=tokenizer.eos_token_id,
            detokenizer=IncrementalDetokenizer(tokenizer, prompt_ids), generator=generator,
        )

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def text(self) -> str:
        """The text generated so far (joined on each read: read it once the sequence is done)."""
        return "".join(self._streamed) + self._pending

    @property
    def last_token(self) -> int:
        return self.output_ids[-1] if self.output_ids else self.prompt_ids[-1]

    def append(self, token_id: int) -> None:
        """Add a sampled token; sets `finish_reason` when a stopping rule fires."""
        self.output_ids.append(token_id)
        if token_id == self.eos_token_id and not self.params.ignore_eos:
            self._finish(FinishReason.EOS)
            return
        if token_id in self.params.stop_token_ids:
            self._finish(FinishReason.STOP)
            return
        delta = self.detokenizer.push(token_id)
        self._pending += delta
        if delta and self.params.stop and self._truncate_at_stop(len(delta)):
            self._finish(FinishReason.STOP)
            return
        if len(self.output_ids) >= self.params.max_tokens or self.num_tokens >= self.max_total_tokens:
            self._finish(FinishReason.LENGTH)

    def abort(self) -> None:
        self._finish(FinishReason.ABORT)

    def take_text_delta(self) -> str:
        """Text not handed out yet. While running, the last characters that could still begin a
        stop string are held back, so a streamed stop string is never half-shown."""
        end = len(self._pending)
        if self.finish_reason is None and self.params.stop:
            end = max(0, end - (max(map(len, self.params.stop)) - 1))
        delta, self._pending = self._pending[:end], self._pending[end:]
        if delta:
            self._streamed.append(delta)
        return delta

    def _finish(self, reason: FinishReason) -> None:
        if self.finish_reason is None:
            self.finish_reason = reason
            if reason in (FinishReason.LENGTH, FinishReason.EOS):
                self._pending += self.detokenizer.flush()

    def _truncate_at_stop(self, delta_len: int) -> bool:
        """Cut the text at the earliest stop string that the last delta completed. Such a string
        ends in the delta and is at most the longest stop string long, so it starts past the
        streamed text (which stays that many characters minus one behind): it lies in `_pending`."""
        longest = max(map(len, self.params.stop))
        start = max(0, len(self._pending) - delta_len - longest + 1)
        hits = [i for s in self.params.stop if (i := self._pending.find(s, start)) >= 0]
        if not hits:
            return False
        self._pending = self._pending[: min(hits)]
        return True
