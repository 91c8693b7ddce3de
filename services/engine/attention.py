"""Cross-layer attention of one decode step: plan once, run once per cross layer.

`plan()` runs the CLSA indexer's top-k once for the step (the index every cross layer reuses) and
splits the batch by attention mode; `run()` is what each cross layer calls with its own queries.
"""

from __future__ import annotations

import torch

from kernels import dense_decode_attention, index_topk, sparse_decode_attention
from kernels._backend import Backend


class CrossAttention:
    def __init__(self, sm_scale: float, backend: Backend = "auto") -> None:
        self.sm_scale = sm_scale
        self.backend = backend
        self._block_table = torch.empty(0, dtype=torch.int32)
        self._seq_lens = torch.empty(0, dtype=torch.int32)
        self._indices: torch.Tensor | None = None
        self._sparse_rows: torch.Tensor | None = None
        self._dense_rows: torch.Tensor | None = None

    def plan(self, q_idx: torch.Tensor, k_idx_cache: torch.Tensor, block_table: torch.Tensor,
             seq_lens: torch.Tensor, sparse: list[bool], topk: int) -> None:
        """Prepare one step. q_idx: [B, d_idx]; sparse[b] says whether row b runs CLSA (top-k
        over the indexer) or DENSE (all positions)."""
        self._block_table = block_table
        self._seq_lens = seq_lens
        self._indices = self._sparse_rows = self._dense_rows = None
        if all(sparse) or not any(sparse):
            if all(sparse):
                self._indices = index_topk(q_idx, k_idx_cache, block_table, seq_lens, topk, backend=self.backend)
            return
        mask = torch.tensor(sparse, device=q_idx.device)
        self._sparse_rows = mask.nonzero()[:, 0]
        self._dense_rows = (~mask).nonzero()[:, 0]
        rows = self._sparse_rows
        self._indices = index_topk(q_idx[rows], k_idx_cache, block_table[rows], seq_lens[rows], topk,
                                   backend=self.backend)

    @property
    def indices(self) -> torch.Tensor | None:
        """The step's top-k positions [B_sparse, k] (None when no row runs CLSA)."""
        return self._indices

    def run(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        """q: [B, Hq, d] of one cross layer -> out [B, Hq, d] over the shared cache."""
        if self._sparse_rows is None:
            if self._indices is not None:
                return self._sparse(q, k_cache, v_cache, slice(None))
            return self._dense(q, k_cache, v_cache, slice(None))
        assert self._dense_rows is not None
        out = torch.empty_like(q)
        out[self._sparse_rows] = self._sparse(q, k_cache, v_cache, self._sparse_rows)
        out[self._dense_rows] = self._dense(q, k_cache, v_cache, self._dense_rows)
        return out

    def _sparse(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                rows: torch.Tensor | slice) -> torch.Tensor:
        assert self._indices is not None
        return sparse_decode_attention(q[rows], k_cache, v_cache, self._block_table[rows], self._seq_lens[rows],
                                       self._indices, self.sm_scale, backend=self.backend)

    def _dense(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               rows: torch.Tensor | slice) -> torch.Tensor:
        return dense_decode_attention(q[rows], k_cache, v_cache, self._block_table[rows], self._seq_lens[rows],
                                      self.sm_scale, backend=self.backend)
