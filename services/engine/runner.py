"""Builds the tensors of a step from sequences and runs the model: prefill and decode.

Prefill runs the layers that keep their own K/V over the prompts in chunks (writing the shared
cache, the indexer keys and the ring buffers), then the cross-decoder for each prompt's last
position only. Decode runs one token per sequence through everything.
"""

from __future__ import annotations

import numpy as np
import torch

from kernels._backend import Backend
from kernels.paged import physical_rows
from services.engine.attention import make_cross_attention
from services.engine.cache import KVCache
from services.engine.graph_step import DecodeGraphs
from services.engine.model import CLSAModel, StepContext
from services.engine.sequence import Sequence


class ModelRunner:
    def __init__(self, model: CLSAModel, cache: KVCache, index_topk: int, prefill_chunk: int,
                 backend: Backend = "auto", graph_batch: int = 0, cross_policy: str = "shared") -> None:
        """`graph_batch` > 0: decode through `DecodeGraphs` (one CUDA graph per batch bucket up to
        that many sequences; it takes one block and one ring slot of `cache` for padding).
        `cross_policy`: how the cross layers select (`attention.CROSS_POLICIES`; the baselines)."""
        self.model = model
        self.cache = cache
        self.index_topk = index_topk
        self.prefill_chunk = prefill_chunk
        self.device = cache.k.device
        self.attention = make_cross_attention(cross_policy, model.sm_scale, backend)
        self.graphs = (DecodeGraphs(model, cache, index_topk, graph_batch, backend, policy=cross_policy)
                       if graph_batch > 0 else None)

    @torch.inference_mode()
    def prefill(self, seqs: list[Sequence]) -> torch.Tensor:
        """Prompts of `seqs` (blocks already granted) -> logits of the first new token [B, V]."""
        lengths = [len(s.prompt_ids) for s in seqs]
        d_model = self.model.cfg.d_model
        # The head's inputs copied now: a host-to-device copy waits for the stream, so made after
        # the chunks it would hold the cross-decoder's launches until the self-decoder had run.
        block_table = self._block_table(seqs)
        seq_lens = torch.tensor(lengths, dtype=torch.int32, device=self.device)
        x_last = torch.zeros(len(seqs), d_model, device=self.device, dtype=self.cache.k.dtype)
        q_idx_last: torch.Tensor | None = None
        for start in range(0, max(lengths), self.prefill_chunk):
            active = [i for i, n in enumerate(lengths) if n > start]
            end = min(start + self.prefill_chunk, max(lengths[i] for i in active))
            # Through numpy: torch.tensor() of a 128K-token list costs ~55 ms of host time, numpy ~5.
            chunk = np.full((len(active), end - start), -1, dtype=np.int64)
            for row, i in enumerate(active):
                piece = seqs[i].prompt_ids[start:end]
                chunk[row, : len(piece)] = np.asarray(piece, dtype=np.int64)
            tokens = torch.from_numpy(chunk).to(self.device)
            ctx = self._context([seqs[i] for i in active], start, tokens >= 0)
            x, q_idx = self.model.forward_chunk(tokens, ctx, self.cache)
            for row, i in enumerate(active):
                if start < lengths[i] <= end:  # this chunk holds the prompt's last token
                    x_last[i] = x[row, lengths[i] - 1 - start]
                    if q_idx is not None:
                        if q_idx_last is None:
                            q_idx_last = q_idx.new_zeros(len(seqs), q_idx.shape[-1])
                        q_idx_last[i] = q_idx[row, lengths[i] - 1 - start]
        return self._head(x_last, q_idx_last, block_table, seq_lens, seqs)

    @torch.inference_mode()
    def decode(self, seqs: list[Sequence]) -> torch.Tensor:
        """One step: each sequence's last token (at position num_tokens - 1) -> logits [B, V]."""
        if self.graphs is not None:
            return self.graphs.decode(seqs)
        tokens = torch.tensor([[s.last_token] for s in seqs], dtype=torch.long, device=self.device)
        ctx = self._context(seqs, None, None)
        x, q_idx = self.model.forward_chunk(tokens, ctx, self.cache)
        return self._head(x[:, 0], None if q_idx is None else q_idx[:, 0], ctx.block_table, ctx.seq_lens, seqs)

    def _head(self, x: torch.Tensor, q_idx: torch.Tensor | None, block_table: torch.Tensor,
              seq_lens: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """Cross-decoder (YOCO) for one token per sequence, then the LM head. seq_lens [B] int32:
        each sequence's tokens, the new one included."""
        if q_idx is not None:
            self.attention.plan(q_idx, self.cache.k_idx, block_table, seq_lens,
                                [s.sparse for s in seqs], self.index_topk)
            positions = seq_lens.long() - 1
            x = self.model.forward_cross(x, positions, self.attention, self.cache)
        return self.model.logits(x)

    def _block_table(self, seqs: list[Sequence]) -> torch.Tensor:
        width = max(len(s.block_ids) for s in seqs)
        table = torch.full((len(seqs), width), -1, dtype=torch.int32)
        for i, s in enumerate(seqs):
            table[i, : len(s.block_ids)] = torch.tensor(s.block_ids, dtype=torch.int32)
        return table.to(self.device)

    def _context(self, seqs: list[Sequence], start: int | None, valid: torch.Tensor | None) -> StepContext:
        """Prefill chunk from `start` (valid: [B, C] mask) or, with start None, a decode step."""
        if start is None:
            positions = torch.tensor([[s.num_tokens - 1] for s in seqs], dtype=torch.long, device=self.device)
        else:
            assert valid is not None
            cols = torch.arange(valid.shape[1], device=self.device) + start
            positions = torch.where(valid, cols, -1)
        block_table = self._block_table(seqs)
        rows = torch.where(positions >= 0, physical_rows(block_table, positions, self.cache.block_size), -1)
        seq_lens = (positions.max(dim=1).values + 1).to(torch.int32)
        # Only the last `swa_window` tokens of a chunk can still be needed by later tokens.
        window = self.model.cfg.swa_window
        enters_ring = (positions >= 0) & (positions > positions.max(dim=1, keepdim=True).values - window)
        ring_b, ring_c = enters_ring.nonzero(as_tuple=True)
        slots = torch.tensor([s.slot for s in seqs], dtype=torch.long, device=self.device)
        return StepContext(positions=positions, rows=rows, block_table=block_table, seq_lens=seq_lens,
                           slots=slots, ring_b=ring_b, ring_c=ring_c, chunk_start=start)
