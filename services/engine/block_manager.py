"""Which KV blocks and ring-buffer slot each sequence holds.

Admission reserves blocks for a sequence's whole life (prompt + the tokens it may generate), so a
running sequence never runs out of blocks mid-decode; the blocks themselves are taken lazily as it
grows, and everything returns to the pool when it finishes or is aborted.
"""

from __future__ import annotations

from services.engine.cache import KVCache
from services.engine.errors import OutOfBlocksError
from services.engine.sequence import Sequence


class BlockManager:
    def __init__(self, cache: KVCache) -> None:
        self.cache = cache
        self.block_size = cache.block_size
        self._outstanding = 0  # reserved by running sequences but not yet taken from the pool

    def blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    @property
    def num_available_blocks(self) -> int:
        """Free blocks not promised to a running sequence."""
        return self.cache.blocks.num_free - self._outstanding

    def can_admit(self, seq: Sequence) -> bool:
        return (self.blocks_for(seq.max_total_tokens) <= self.num_available_blocks
                and self.cache.slots.num_free > 0)

    def admit(self, seq: Sequence) -> None:
        need = self.blocks_for(seq.max_total_tokens)
        if need > self.num_available_blocks:
            raise OutOfBlocksError(
                f"request {seq.request_id} needs {need} KV blocks for {seq.max_total_tokens} tokens; "
                f"{self.num_available_blocks} of {self.cache.num_blocks} are available"
            )
        seq.slot = self.cache.slots.allocate(1)[0]
        self.cache.reset_slot(seq.slot)
        seq.reserved_blocks = need
        self._outstanding += need

    def grow(self, seq: Sequence, n_tokens: int) -> None:
        """Make sure `seq` holds blocks for its first `n_tokens` positions."""
        want = self.blocks_for(n_tokens) - len(seq.block_ids)
        if want <= 0:
            return
        if len(seq.block_ids) + want > seq.reserved_blocks:
            raise OutOfBlocksError(
                f"request {seq.request_id} grew to {n_tokens} tokens, past its reservation of "
                f"{seq.reserved_blocks} blocks"
            )
        seq.block_ids.extend(self.cache.blocks.allocate(want))
        self._outstanding -= want

    def release(self, seq: Sequence) -> None:
        if seq.slot < 0:
            return
        self.cache.blocks.free(seq.block_ids)
        self._outstanding -= seq.reserved_blocks - len(seq.block_ids)
        self.cache.slots.free([seq.slot])
        seq.block_ids, seq.reserved_blocks, seq.slot = [], 0, -1
