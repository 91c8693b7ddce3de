"""Model configuration: one frozen dataclass, the named presets, and JSON round trip.

`arch="yoco"` is the YOCO decoder-decoder with the CLSA indexer (DESIGN.md section 2): the first
`n_layers // 2` layers are sliding-window self layers, the rest are cross layers over one shared
K/V cache, routed by a single-head indexer. `arch="transformer"` is a standard decoder of the same
dimensions in which every layer keeps its own K/V cache and attends densely; benchmarks use it as
the baseline.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Literal

Arch = Literal["yoco", "transformer"]


@dataclass(frozen=True)
class ModelConfig:
    arch: Arch = "yoco"
    vocab_size: int = 259
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int = 32
    ffn_dim: int = 384
    swa_window: int = 512
    rope_theta: float = 10000.0
    # RNoPE hybrid (DESIGN.md section 2): RoPE in the self layers, none on the shared K/V unless
    # this is set, in which case shared keys and cross-layer queries are rotated by position.
    cross_rope: bool = False
    index_dim: int = 128
    index_topk: int = 2048
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    max_seq_len: int = 131072
    bos_token_id: int = 256
    eos_token_id: int = 257

    def __post_init__(self) -> None:
        def need(cond: bool, message: str) -> None:
            if not cond:
                raise ValueError(f"ModelConfig: {message}")

        need(self.arch in ("yoco", "transformer"), f"arch must be 'yoco' or 'transformer', got {self.arch!r}")
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                     "ffn_dim", "swa_window", "index_dim", "index_topk", "max_seq_len"):
            need(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        need(self.n_layers % 2 == 0, f"n_layers must be even (half self, half cross), got {self.n_layers}")
        need(self.n_heads % self.n_kv_heads == 0,
             f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        need(self.head_dim % 2 == 0, f"head_dim must be even for RoPE, got {self.head_dim}")
        need(self.rope_theta > 0, f"rope_theta must be > 0, got {self.rope_theta}")
        need(self.norm_eps > 0, f"norm_eps must be > 0, got {self.norm_eps}")
        for name in ("bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            need(0 <= value < self.vocab_size, f"{name} {value} outside the vocabulary [0, {self.vocab_size})")

    @property
    def is_yoco(self) -> bool:
        return self.arch == "yoco"

    @property
    def n_self_layers(self) -> int:
        """Sliding-window layers (YOCO) or 0 (transformer)."""
        return self.n_layers // 2 if self.is_yoco else 0

    @property
    def n_cross_layers(self) -> int:
        return self.n_layers // 2 if self.is_yoco else 0

    @property
    def n_kv_caches(self) -> int:
        """How many global K/V caches decode keeps: one shared (YOCO) or one per layer."""
        return 1 if self.is_yoco else self.n_layers

    def kv_bytes_per_token(self, element_size: int) -> int:
        """Bytes of global cache per token: K and V of every global cache, plus the indexer key."""
        kv = 2 * self.n_kv_caches * self.n_kv_heads * self.head_dim
        index = self.index_dim if self.is_yoco else 0
        return (kv + index) * element_size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"ModelConfig: unknown fields {unknown}")
        return cls(**data)


PRESETS: dict[str, ModelConfig] = {
    # A few million parameters: tests and the CPU demo. Window and k small enough that a
    # few-hundred-token prompt already exercises both the ring buffer and the sparse path.
    "clsa-tiny": ModelConfig(
        vocab_size=259, d_model=256, n_layers=4, n_heads=8, n_kv_heads=2, head_dim=32,
        ffn_dim=768, swa_window=64, index_dim=32, index_topk=128, max_seq_len=8192,
    ),
    # The model `clsa train` makes (~18M parameters, 36 MB in bf16): byte-level, a 128-token window
    # so that anything further back must come through the cross decoder, k = 512 (N/16 at 8K).
    "clsa-small": ModelConfig(
        vocab_size=259, d_model=384, n_layers=12, n_heads=6, n_kv_heads=2, head_dim=64,
        ffn_dim=1024, swa_window=128, index_dim=64, index_topk=512, max_seq_len=16384 + 1024,
    ),
    # The paper's scale (16 SWA + 16 cross layers), for GPU benchmarks with random weights.
    "clsa-4b": ModelConfig(
        vocab_size=32000, d_model=3072, n_layers=32, n_heads=24, n_kv_heads=8, head_dim=128,
        ffn_dim=8192, swa_window=512, index_dim=128, index_topk=2048, tie_embeddings=False,
        max_seq_len=131072 + 4096,
    ),
}
PRESETS["transformer-4b"] = dataclasses.replace(PRESETS["clsa-4b"], arch="transformer")


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}") from None
