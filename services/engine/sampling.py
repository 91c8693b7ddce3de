"""Sampling parameters (validated) and the batched sampler."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from services.engine.errors import InvalidRequestError

MAX_STOP_STRINGS = 64
MAX_STOP_STRING_CHARS = 256


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token and when to stop.

    temperature 0 is greedy. top_k 0 and top_p 1 disable those filters. `seed` makes a request's
    samples reproducible regardless of what else is in its batch. Stop strings end generation and
    are not part of the returned text; stop token ids and EOS end it too (EOS unless ignore_eos).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        def bad(param: str, why: str) -> InvalidRequestError:
            return InvalidRequestError(param, why)

        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise bad("max_tokens", f"must be an integer >= 1, got {self.max_tokens!r}")
        if not _finite(self.temperature) or self.temperature < 0:
            raise bad("temperature", f"must be a finite number >= 0, got {self.temperature!r}")
        if not _finite(self.top_p) or not 0 < self.top_p <= 1:
            raise bad("top_p", f"must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise bad("top_k", f"must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or not 0 <= self.seed < 2**63):
            raise bad("seed", f"must be an integer in [0, 2^63), got {self.seed!r}")
        if isinstance(self.stop, str) or isinstance(self.stop_token_ids, int):
            raise bad("stop" if isinstance(self.stop, str) else "stop_token_ids", "must be a sequence")
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if len(self.stop) > MAX_STOP_STRINGS:
            raise bad("stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}")
        for s in self.stop:
            if not isinstance(s, str) or not s or len(s) > MAX_STOP_STRING_CHARS:
                raise bad("stop", f"each stop string must be 1-{MAX_STOP_STRING_CHARS} characters, got {s!r}")
        for t in self.stop_token_ids:
            if isinstance(t, bool) or not isinstance(t, int) or t < 0:
                raise bad("stop_token_ids", f"must be token ids >= 0, got {t!r}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0


def _finite(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


class Sampler:
    """Samples one token per row. Rows with a seed draw from their own generator, so a request's
    tokens do not depend on its batch-mates; the rest share one engine generator."""

    def __init__(self, device: torch.device, seed: int | None = None) -> None:
        self.device = device
        self._shared = torch.Generator(device=device)
        if seed is None:
            self._shared.seed()
        else:
            self._shared.manual_seed(seed)

    def make_generator(self, seed: int | None) -> torch.Generator | None:
        if seed is None:
            return None
        return torch.Generator(device=self.device).manual_seed(seed)

    def sample(self, logits: torch.Tensor, params: list[SamplingParams],
               generators: list[torch.Generator | None]) -> list[int]:
        """logits: [B, V] -> one token id per row."""
        logits = logits.float()
        tokens = logits.argmax(dim=-1)
        rows = [i for i, p in enumerate(params) if not p.is_greedy]
        if rows:
            idx = torch.tensor(rows, device=logits.device)
            probs = self._filtered_probs(logits[idx], [params[i] for i in rows])
            for j, i in enumerate(rows):
                gen = generators[i] or self._shared
                tokens[i] = torch.multinomial(probs[j], 1, generator=gen)[0]
        return tokens.tolist()

    @staticmethod
    def _filtered_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        """Temperature, then top-k, then top-p (nucleus), as probabilities [n, V]."""
        device = logits.device
        temperature = torch.tensor([p.temperature for p in params], device=device)[:, None]
        logits = logits / temperature
        vocab = logits.shape[-1]
        top_k = torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params], device=device)
        top_p = torch.tensor([p.top_p for p in params], device=device)[:, None]
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        rank = torch.arange(vocab, device=device)[None, :]
        sorted_logits = sorted_logits.masked_fill(rank >= top_k[:, None], float("-inf"))
        sorted_probs = sorted_logits.softmax(dim=-1)
        # Keep the smallest prefix whose mass reaches top_p: drop a token when the mass before
        # it already does. The first token always survives.
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
        probs = torch.zeros_like(sorted_probs).scatter_(-1, order, sorted_probs)
        return probs / probs.sum(dim=-1, keepdim=True)
