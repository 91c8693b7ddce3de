"""Cross-layer attention of one decode step: plan once, run once per cross layer.

`plan()` runs the CLSA indexer's top-k once for the step (the index every cross layer reuses),
translates it to cache rows once (the sparse kernel's own plan), and splits the batch by attention
mode; `run()` is what each cross layer calls with its own queries.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels import SparseDecodeWrapper, dense_decode_attention, index_topk
from kernels._backend import Backend
from kernels.paged import gather_tokens, physical_rows

SCORE_ROWS = 4  # sequences whose indexer keys TorchGatherAttention gathers at once


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
        # Set by a caller of fixed shapes (the CUDA graph's step): the dense kernels' kept scratch.
        self.dense_workspace: dict | None = None

    def plan(self, q_idx: torch.Tensor, k_idx_cache: torch.Tensor, block_table: torch.Tensor,
             seq_lens: torch.Tensor, sparse: list[bool], topk: int,
             kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Prepare one step. q_idx: [B, d_idx]; sparse[b] says whether row b runs CLSA (top-k
        over the indexer) or DENSE (all positions). `kv`: the shared (k_cache, v_cache) the layers
        will run over, already holding this step's token: the sparse plan may copy the selected
        rows out of it once (`SparseDecodeWrapper.plan`'s `gather_from`)."""
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
        self._sparse.plan(block_table[rows], seq_lens[rows], self._indices, k_idx_cache.shape[1], gather_from=kv)

    @property
    def gathered(self) -> torch.Tensor | None:
        """The step's compact copy of the selected K/V rows, when the plan made one."""
        return self._sparse.gathered

    @property
    def indices(self) -> torch.Tensor | None:
        """The step's top-k positions [B_sparse, k] (None when no row runs CLSA)."""
        return self._indices

    def run(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
            l2_next: torch.Tensor | None = None) -> torch.Tensor:
        """q: [B, Hq, d] of one cross layer -> out [B, Hq, d] over the shared cache. `l2_next`:
        what the layer reads next (its output projection's weight), asked of L2 by an all-CLSA
        batch's sparse kernel (`SparseDecodeWrapper.run`)."""
        if self._indices is None:
            return self._dense(q, k_cache, v_cache, slice(None))
        if self._sparse_rows is None:
            return self._sparse.run(q, k_cache, v_cache, self.sm_scale, l2_next=l2_next)
        assert self._dense_rows is not None
        out = torch.empty_like(q)
        out[self._sparse_rows] = self._sparse.run(q[self._sparse_rows], k_cache, v_cache, self.sm_scale)
        out[self._dense_rows] = self._dense(q, k_cache, v_cache, self._dense_rows)
        return out

    def _dense(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               rows: torch.Tensor | slice) -> torch.Tensor:
        return dense_decode_attention(q[rows], k_cache, v_cache, self._block_table[rows], self._seq_lens[rows],
                                      self.sm_scale, backend=self.backend, workspace=self.dense_workspace)


class PerLayerTopkAttention(CrossAttention):
    """The DSA-style baseline: no index shared across layers - every cross layer runs the
    indexer's top-k (and the row translation) itself before its sparse attention (`plan` only
    keeps the step's inputs). Each layer scores the same indexer query, so the selection, and the
    output, equal `CrossAttention`'s; what it measures is the routing cost repeated in every layer."""

    def plan(self, q_idx: torch.Tensor, k_idx_cache: torch.Tensor, block_table: torch.Tensor,
             seq_lens: torch.Tensor, sparse: list[bool], topk: int,
             kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        self._args = (q_idx, k_idx_cache, block_table, seq_lens, sparse, topk)  # each layer plans for itself

    def run(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
            l2_next: torch.Tensor | None = None) -> torch.Tensor:
        super().plan(*self._args)
        return super().run(q, k_cache, v_cache, l2_next)


class TorchGatherAttention(CrossAttention):
    """Plain-torch CLSA, the simplest honest implementation: torch scoring over the whole block
    table + `torch.topk` once per step, the selected K/V rows gathered once per step (by the first
    layer) into contiguous [B, Hkv, k, d] buffers, and every cross layer through SDPA over them
    (a KV head's G query heads as G query rows, so no GQA expansion). Needs an all-CLSA batch;
    one with DENSE rows runs as `CrossAttention`."""

    def plan(self, q_idx: torch.Tensor, k_idx_cache: torch.Tensor, block_table: torch.Tensor,
             seq_lens: torch.Tensor, sparse: list[bool], topk: int,
             kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        self._selected: tuple[torch.Tensor, torch.Tensor] | None = None
        self._kv: tuple[torch.Tensor, torch.Tensor] | None = None
        if not all(sparse):
            super().plan(q_idx, k_idx_cache, block_table, seq_lens, sparse, topk)
            return
        self._block_table, self._seq_lens = block_table, seq_lens
        self._indices = self._sparse_rows = self._dense_rows = None
        width = block_table.shape[1] * k_idx_cache.shape[1]
        positions = torch.arange(width, device=q_idx.device).expand(q_idx.shape[0], width)
        valid = positions < seq_lens[:, None]
        scores = torch.cat([  # SCORE_ROWS sequences at a time bound the gathered keys' memory
            torch.einsum("bd,bnd->bn", q_idx[i:i + SCORE_ROWS],
                         gather_tokens(k_idx_cache, block_table[i:i + SCORE_ROWS], positions[i:i + SCORE_ROWS]))
            for i in range(0, q_idx.shape[0], SCORE_ROWS)])
        scores = scores.float().masked_fill(~valid, float("-inf"))
        chosen = scores.topk(min(topk, width), dim=1).indices
        self._selected = (physical_rows(block_table, chosen, k_idx_cache.shape[1]), torch.gather(valid, 1, chosen))

    def run(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
            l2_next: torch.Tensor | None = None) -> torch.Tensor:
        if self._selected is None:
            return super().run(q, k_cache, v_cache, l2_next)
        rows, valid = self._selected
        batch, n_q_heads, head_dim = q.shape
        n_kv_heads = k_cache.shape[2]
        if self._kv is None:  # the first layer of the step gathers; the others reuse it
            flat_k = k_cache.view(-1, n_kv_heads, head_dim)
            flat_v = v_cache.view(-1, n_kv_heads, head_dim)
            self._kv = (flat_k[rows].transpose(1, 2).contiguous(), flat_v[rows].transpose(1, 2).contiguous())
        k_sel, v_sel = self._kv
        qg = q.view(batch, n_kv_heads, n_q_heads // n_kv_heads, head_dim)
        out = F.scaled_dot_product_attention(qg, k_sel, v_sel, attn_mask=valid[:, None, None, :],
                                             scale=self.sm_scale)
        return out.reshape(batch, n_q_heads, head_dim)


_POLICIES: dict[str, type[CrossAttention]] = {
    "shared": CrossAttention, "per_layer": PerLayerTopkAttention, "torch_gather": TorchGatherAttention}
CROSS_POLICIES: tuple[str, ...] = tuple(_POLICIES)


def make_cross_attention(policy: str, sm_scale: float, backend: Backend = "auto") -> CrossAttention:
    """The cross attention of a step under `policy` (`CROSS_POLICIES`)."""
    if policy not in _POLICIES:
        raise ValueError(f"cross attention policy must be one of {CROSS_POLICIES}, got {policy!r}")
    return _POLICIES[policy](sm_scale, backend)
