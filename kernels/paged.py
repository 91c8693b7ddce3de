"""The paged-cache convention (vLLM/FlashInfer): token position p of sequence b lives in block
`block_table[b, p // block_size]`, row `p % block_size`."""

from __future__ import annotations

import torch


def physical_rows(block_table: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """Flat row of each token position in a cache viewed as `[num_blocks * block_size, ...]`.

    block_table: [B, max_blocks] int32; positions: [B, n] (negative entries are padding and map to
    row 0; callers mask them). Returns [B, n] int64.
    """
    pos = positions.clamp(min=0).long()
    # Unused block-table entries may hold -1: clamp so padding reads a real row (then masked).
    blocks = torch.gather(block_table.long(), 1, pos // block_size).clamp(min=0)
    return blocks * block_size + pos % block_size


def gather_tokens(cache: torch.Tensor, block_table: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rows of a paged cache `[num_blocks, block_size, *feat]` at `positions [B, n]` -> `[B, n, *feat]`."""
    num_blocks, block_size = cache.shape[:2]
    rows = physical_rows(block_table, positions, block_size)
    flat = cache.reshape(num_blocks * block_size, *cache.shape[2:])
    return flat[rows]
