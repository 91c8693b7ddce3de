"""Cross-layer attention of one decode step: plan once, run once per cross layer.

`plan()` runs the CLSA indexer's top-k once for the step (the index every cross layer reuses),
translates it to cache rows once (the sparse kernel's own plan), and splits the batch by attention
mode; `run()` is what each cross layer calls with its own queries.
"""

from __future__ import annotations

import torch

from kernels import SparseDecodeWrapper, dense_decode_attention, index_topk
from kernels._backend import Backend


class CrossAttention:
    def __init__(self, sm_scale: float, backend: Backend = "auto") -> None:
        self.sm_scale = sm_scale
        self.backend = backend
        self._sparse = SparseDecodeWrapper(backend)
        self._block_table = torch.empty(0, dtype=torch.int32)
        self._seq_lens = torch.empty(0, dtype=torch.int32)
        self._indices: torch.Tensor | None = None
        self._sparse_rows: torch.Tensor | None = None  # set only when the batch mixes modes
        self._dense_rows: torch.Tensor | None = None

    def plan(self, q_idx: torch.Tensor, k_idx_cache: torch.Tensor, block_table: torch.Tensor,
             seq_lens: torch.Tensor, sparse: list[bool], topk: int) -> None:
        """Prepare one step. q_idx: [B, d_idx]; sparse[b] says whether row b runs CLSA (top-k
        over the indexer) or DENSE (all positions)."""
        self._block_table, self._seq_lens = block_table, seq_lens
        self._indices = self._sparse_rows = self._dense_rows = None
        if not any(sparse):
            return
        if all(sparse):
            rows: torch.Tensor | slice = slice(None)
        else:
            mask = torch.tensor(sparse, device=q_idx.device)
            self._sparse_rows, self._dense_rows = mask.nonzero()[:, 0], (~mask).nonzero()[:, 0]
            rows = self._sparse_rows
        self._indices = index_topk(q_idx[rows], k_idx_cache, block_table[rows], seq_lens[rows], topk,
                                   backend=self.backend)
        self._sparse.plan(block_table[rows], seq_lens[rows], self._indices, k_idx_cache.shape[1])

    @property
    def indices(self) -> torch.Tensor | None:
        """The step's top-k positions [B_sparse, k] (None when no row runs CLSA)."""
        return self._indices

    def run(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        """q: [B, Hq, d] of one cross layer -> out [B, Hq, d] over the shared cache."""
        if self._indices is None:
            return self._dense(q, k_cache, v_cache, slice(None))
        if self._sparse_rows is None:
            return self._sparse.run(q, k_cache, v_cache, self.sm_scale)
        assert self._dense_rows is not None
        out = torch.empty_like(q)
        out[self._sparse_rows] = self._sparse.run(q[self._sparse_rows], k_cache, v_cache, self.sm_scale)
        out[self._dense_rows] = self._dense(q, k_cache, v_cache, self._dense_rows)
        return out

    def _dense(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               rows: torch.Tensor | slice) -> torch.Tensor:
        return dense_decode_attention(q[rows], k_cache, v_cache, self._block_table[rows], self._seq_lens[rows],
                                      self.sm_scale, backend=self.backend)
