"""Decode-time state: the paged global cache and the self layers' sliding-window ring buffers.

YOCO keeps ONE global cache for the whole cross-decoder: K and V of the shared projection plus
the indexer key, per token, in fixed-size blocks. The transformer baseline keeps one K/V cache
per layer in the same paged layout (and no indexer keys). Which blocks a sequence holds is
recorded in its block table; `FreeList` hands blocks (and ring-buffer slots) out and back.
"""

from __future__ import annotations

import torch

from services.engine.config import ModelConfig
from services.engine.errors import OutOfBlocksError


class FreeList:
    """A pool of `capacity` integer ids handed out and returned; `kind` names them in errors."""

    def __init__(self, capacity: int, kind: str) -> None:
        if capacity < 1:
            raise ValueError(f"{kind} pool needs capacity >= 1, got {capacity}")
        self.capacity = capacity
        self.kind = kind
        # Popping from the end hands out low ids first.
        self._free = list(range(capacity - 1, -1, -1))
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self._used)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfBlocksError(
                f"out of {self.kind}s: need {n}, {len(self._free)} free of {self.capacity}"
            )
        ids = [self._free.pop() for _ in range(n)]
        self._used.update(ids)
        return ids

    def free(self, ids: list[int]) -> None:
        for i in ids:
            if i not in self._used:
                raise ValueError(f"{self.kind} {i} freed but not allocated")
            self._used.remove(i)
            self._free.append(i)


class KVCache:
    """The tensors of decode state, preallocated once.

    k, v:    [n_kv_caches, num_blocks, block_size, Hkv, d]   (1 cache for YOCO, n_layers otherwise)
    k_idx:   [num_blocks, block_size, d_idx]                  (YOCO only)
    swa_k, swa_v: [n_self_layers, max_seqs, W, Hkv, d]        ring buffers of the self layers
    swa_pos: [max_seqs, W] int64                              position held by each ring row, -1 empty
    """

    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, max_seqs: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.cfg = cfg
        self.block_size = block_size
        self.blocks = FreeList(num_blocks, "KV block")
        self.slots = FreeList(max_seqs, "sequence slot")
        kv_shape = (cfg.n_kv_caches, num_blocks, block_size, cfg.n_kv_heads, cfg.head_dim)
        self.k = torch.zeros(kv_shape, device=device, dtype=dtype)
        self.v = torch.zeros(kv_shape, device=device, dtype=dtype)
        index_dim = cfg.index_dim if cfg.is_yoco else 0
        self.k_idx = torch.zeros((num_blocks, block_size, index_dim), device=device, dtype=dtype)
        window = cfg.swa_window if cfg.is_yoco else 0
        ring_shape = (cfg.n_self_layers, max_seqs, window, cfg.n_kv_heads, cfg.head_dim)
        self.swa_k = torch.zeros(ring_shape, device=device, dtype=dtype)
        self.swa_v = torch.zeros(ring_shape, device=device, dtype=dtype)
        self.swa_pos = torch.full((max_seqs, window), -1, device=device, dtype=torch.long)

    @property
    def num_blocks(self) -> int:
        return self.blocks.capacity

    @property
    def bytes_per_token(self) -> int:
        """Bytes of paged global cache per token slot, measured from the allocated tensors."""
        total = sum(t.numel() * t.element_size() for t in (self.k, self.v, self.k_idx))
        return total // (self.num_blocks * self.block_size)

    @property
    def bytes_in_use(self) -> int:
        return self.blocks.num_used * self.block_size * self.bytes_per_token

    def reset_slot(self, slot: int) -> None:
        """Forget a ring buffer before a new sequence takes the slot."""
        self.swa_pos[slot] = -1
