"""The YOCO decoder-decoder with the CLSA indexer, and the transformer baseline.

Two ways to run it:
- `forward_full(tokens)`: the whole sequence at once with explicit masks, no cache. This is the
  spec the incremental path is tested against, and the path training uses.
- `forward_chunk` + `forward_cross`: incremental, over the paged cache and ring buffers of
  `KVCache`, as the engine's prefill (chunks of many tokens) and decode (chunks of one) run it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, cast

import torch
from torch import nn

from kernels import dense_decode_attention
from kernels._backend import Backend
from kernels.paged import gather_tokens
from kernels.window_attention import window_attention
from services.engine.attention import CrossAttention
from services.engine.cache import KVCache
from services.engine.config import ModelConfig
from services.engine.layers import (
    AttentionLayer,
    CrossLayer,
    RMSNorm,
    Rope,
    SharedKV,
    causal_attention,
    fuse_linears,
    masked_attention,
    project,
    rope_angles,
    sliding_window_attention,
)

AttentionMode = Literal["clsa", "dense"]


@dataclass
class CrossInputs:
    """What the cross decoder saw in a training pass, for indexer distillation and recall:
    every cross layer's queries [B, T, Hq, d], the shared keys [B, T, Hkv, d], and the normalised
    boundary activations [B, T, D] the indexer projects."""

    queries: list[torch.Tensor]
    keys: torch.Tensor
    boundary: torch.Tensor


@dataclass
class StepContext:
    """Where the tokens of one chunk go. B sequences, C tokens each (padded with -1).

    positions:   [B, C] int64 token positions, -1 for padding
    rows:        [B, C] int64 flat row of each position in the paged cache, -1 for padding
    block_table: [B, max_blocks] int32
    seq_lens:    [B] int32 tokens each sequence holds once this chunk is written
    slots:       [B] int64 ring-buffer slot of each sequence (YOCO)
    ring_b, ring_c: [n] int64 the (sequence, chunk column) pairs whose K/V enter the ring buffers:
                 the last `swa_window` valid tokens of each sequence in this chunk
    chunk_start: the position of every sequence's first token in a prefill chunk (padding only at
                 the end of a row); None for a decode step. 0 means the chunk is the prompt's
                 start: nothing before it, so attention needs only the chunk's own keys.
    """

    positions: torch.Tensor
    rows: torch.Tensor
    block_table: torch.Tensor
    seq_lens: torch.Tensor
    slots: torch.Tensor
    ring_b: torch.Tensor
    ring_c: torch.Tensor
    chunk_start: int | None = None


def indexer_topk_mask(q_idx: torch.Tensor, k_idx: torch.Tensor, k: int) -> torch.Tensor:
    """[B, T, T] boolean: position t may attend to s when s <= t and s is among the top-k of
    `q_idx[t] . k_idx[s]` over s <= t (every s <= t when t + 1 <= k) - CLSA's selection for a
    whole sequence at once."""
    length = q_idx.shape[1]
    pos = torch.arange(length, device=q_idx.device)
    causal = pos[None, :] <= pos[:, None]
    scores = torch.einsum("btd,bsd->bts", q_idx.float(), k_idx.float()).masked_fill(~causal, float("-inf"))
    chosen = scores.topk(min(k, length), dim=-1).indices
    return torch.zeros(scores.shape, dtype=torch.bool, device=q_idx.device).scatter_(-1, chosen, True) & causal


# The window kernel's backend when `use_window_kernel` says yes ("auto": Triton on a GPU; the tests
# set "triton" and make `use_window_kernel` say yes to run it interpreted on CPU tensors).
WINDOW_BACKEND: Backend = "auto"
# The window kernel rotates the queries (RoPE) as it loads them, so no pass over q is left for it;
# off (the default): the compiled layer rotates q, as every other path does. On the H200 the kernel
# takes 0.22-0.50 ms a layer longer with it, about what the pass costs, and CLSA's 128K prefill ran
# 744.9 ms with it against 747.6 without, within the runs' spread (docs/performance.md).
WINDOW_ROPE = False


def use_window_kernel(device: torch.device, head_dim: int) -> bool:
    """Whether prefill's window layers go through `kernels.window_attention` (on a GPU, head_dim a
    power of two >= 16) rather than SDPA (in blocks for a first chunk, under a mask after it)."""
    return device.type == "cuda" and head_dim >= 16 and head_dim & (head_dim - 1) == 0


class CLSAModel(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        # Set by whoever made the weights (checkpoint.py): identifies config + weights.
        self.fingerprint = ""
        self.sm_scale = 1.0 / math.sqrt(cfg.head_dim)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        n_own_kv = cfg.n_self_layers if cfg.is_yoco else cfg.n_layers
        # YOCO: the sliding-window self layers; transformer: every layer.
        self.layers = nn.ModuleList(AttentionLayer(cfg) for _ in range(n_own_kv))
        self.shared = SharedKV(cfg) if cfg.is_yoco else None
        self.cross_layers = nn.ModuleList(CrossLayer(cfg) for _ in range(cfg.n_cross_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Deterministic random weights: N(0, 0.02), output projections scaled by depth."""
        gen = torch.Generator(device="cpu").manual_seed(seed)
        out_std = 0.02 / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
                continue
            std = out_std if name.endswith(("wo.weight", "w_down.weight")) else 0.02
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).mul_(std))

    @torch.no_grad()
    def fuse_projections(self) -> None:
        """Stack the projections that read the same input into one weight each (q/k/v of the self
        layers; k/v/k_idx/q_idx of the boundary; gate/up of every FFN): fewer, larger GEMMs at
        decode. The layers' own weights become views of the stacked ones (`layers.fuse_linears`),
        so checkpoints and outputs are unchanged. For inference: done after the last `.to()`."""
        for layer in self.own_kv_layers:
            layer.fused = fuse_linears(layer.wq, layer.wk, layer.wv)
        if self.shared is not None:
            s = self.shared
            s.fused = fuse_linears(s.wk, s.wv, s.wk_idx, s.wq_idx)
        for block in [*self.own_kv_layers, *self.cross_decoder]:
            block.ffn.fused = fuse_linears(block.ffn.w_gate, block.ffn.w_up)

    def compile_layers(self, mode: str | None = None) -> None:
        """Compile each layer's projections, norms, RoPE and FFN with `torch.compile` (inductor
        fuses the pointwise work around the GEMMs into a few kernels), shapes dynamic so that
        every batch size and chunk length shares the code. For the CUDA decode and prefill paths;
        attention stays ours (SDPA's for the Transformer's prefill).
        `mode`: torch.compile's (e.g. "max-autotune-no-cudagraphs" also times Triton GEMMs)."""
        import torch._dynamo

        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)

        def fast(fn):  # noqa: ANN001, ANN202
            return torch.compile(fn, dynamic=True, mode=mode)
        for layer in self.own_kv_layers:
            layer.qkv = fast(layer.qkv)  # type: ignore[method-assign]
            layer.finish = fast(layer.finish)  # type: ignore[method-assign]
        for cross in self.cross_decoder:
            cross.query = fast(cross.query)  # type: ignore[method-assign]
            cross.finish = fast(cross.finish)  # type: ignore[method-assign]
        if self.shared is not None:
            self.shared.forward = fast(self.shared.forward)  # type: ignore[method-assign]
        self.logits = fast(self.logits)  # type: ignore[method-assign]

    @property
    def own_kv_layers(self) -> list[AttentionLayer]:
        return cast(list[AttentionLayer], list(self.layers))

    @property
    def cross_decoder(self) -> list[CrossLayer]:
        return cast(list[CrossLayer], list(self.cross_layers))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return project(x, self.embed.weight if self.lm_head is None else self.lm_head.weight, self.norm)

    # ---- whole-sequence path (spec, training) ----------------------------------------------

    def forward_full(self, tokens: torch.Tensor, attention: AttentionMode = "dense",
                     index_topk: int | None = None) -> torch.Tensor:
        """tokens: [B, T] -> logits [B, T, V], every position attending as decode would."""
        cfg = self.cfg
        batch, length = tokens.shape
        pos = torch.arange(length, device=tokens.device)
        positions = pos.expand(batch, length)
        causal = pos[None, :] <= pos[:, None]  # [T(query), T(key)]
        window = causal & (pos[:, None] - pos[None, :] < cfg.swa_window) if cfg.is_yoco else causal
        x = self.embed(tokens)
        for layer in self.own_kv_layers:
            q, k, v = layer.qkv(x, positions)
            x = layer.finish(x, masked_attention(q, k, v, window.expand(batch, -1, -1), self.sm_scale))
        if self.shared is None:
            return self.logits(x)
        k, v, k_idx, q_idx = self.shared(x, positions)
        mask = causal.expand(batch, -1, -1)
        if attention == "clsa":
            mask = indexer_topk_mask(q_idx, k_idx, index_topk or cfg.index_topk)
        for cross in self.cross_decoder:
            q = cross.query(x, positions)
            x = cross.finish(x, masked_attention(q, k, v, mask, self.sm_scale))
        return self.logits(x)

    def forward_train(self, tokens: torch.Tensor, collect: bool = False, index_topk: int | None = None
                      ) -> torch.Tensor | tuple[torch.Tensor, CrossInputs]:
        """tokens: [B, T] -> logits [B, T, V] with dense attention, the training path: the same
        function as `forward_full(tokens, "dense")` without T x T masks (sliding-window layers in
        blocks of the window, cross and transformer layers causal through SDPA). `collect=True`
        also returns the cross decoder's inputs (`CrossInputs`). `index_topk=k`: the cross layers
        attend, as CLSA does, to the indexer's top-k positions only - `forward_full(tokens, "clsa",
        k)` - chosen without gradient (the LM loss trains the backbone to use the selection; the
        indexer learns from distillation)."""
        cfg = self.cfg
        batch, length = tokens.shape
        positions = torch.arange(length, device=tokens.device).expand(batch, length)
        x = self.embed(tokens)
        for layer in self.own_kv_layers:
            q, k, v = layer.qkv(x, positions)
            if cfg.is_yoco:
                attn = sliding_window_attention(q, k, v, cfg.swa_window, self.sm_scale)
            else:
                attn = causal_attention(q, k, v, self.sm_scale)
            x = layer.finish(x, attn)
        if self.shared is None:
            if collect:
                raise ValueError("collect=True needs a YOCO model (cross layers)")
            return self.logits(x)
        k, v, k_idx, q_idx = self.shared(x, positions)
        selected = None
        if index_topk is not None:
            with torch.no_grad():
                selected = indexer_topk_mask(q_idx, k_idx, index_topk)
        queries = []
        boundary = self.shared.kv_norm(x)
        for cross in self.cross_decoder:
            q = cross.query(x, positions)
            queries.append(q)
            attn = causal_attention(q, k, v, self.sm_scale) if selected is None else masked_attention(
                q, k, v, selected, self.sm_scale)
            x = cross.finish(x, attn)
        logits = self.logits(x)
        return (logits, CrossInputs(queries, k, boundary)) if collect else logits

    # ---- incremental path (engine) ---------------------------------------------------------

    def forward_chunk(self, tokens: torch.Tensor, ctx: StepContext,
                      cache: KVCache) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run the layers that keep their own K/V over a chunk and write every cache it feeds.

        tokens: [B, C]. Returns the hidden states [B, C, D] (after the self-decoder for YOCO, after
        every layer for the transformer) and the indexer queries [B, C, d_idx] (YOCO) or None.
        """
        x = self.embed(tokens.clamp(min=0))
        # The chunk's real tokens, flat, found once (one host sync), then indexed without one.
        valid = (ctx.positions >= 0).flatten().nonzero().squeeze(1)
        rows = ctx.rows.flatten().index_select(0, valid)

        def real(t: torch.Tensor) -> torch.Tensor:
            return t.flatten(0, 1).index_select(0, valid)
        rope = rope_angles(ctx.positions, self.cfg.head_dim, self.cfg.rope_theta)  # once for every layer
        if self.shared is None:
            for i, layer in enumerate(self.own_kv_layers):
                q, k, v = layer.qkv(x, rope)
                cache.k[i].view(-1, *k.shape[2:])[rows] = real(k)
                cache.v[i].view(-1, *v.shape[2:])[rows] = real(v)
                if ctx.chunk_start == 0 and q.shape[1] > 1:  # the prompt's first chunk: flash causal over it
                    attn = causal_attention(q, k, v, self.sm_scale)
                else:
                    attn = self._global_attention(q, cache.k[i], cache.v[i], ctx)
                x = layer.finish(x, attn)
            return x, None
        x = self._self_decoder(x, ctx, cache, rope)
        k, v, k_idx, q_idx = self.shared(x, rope)
        cache.k[0].view(-1, *k.shape[2:])[rows] = real(k)
        cache.v[0].view(-1, *v.shape[2:])[rows] = real(v)
        cache.k_idx.view(-1, k_idx.shape[-1])[rows] = real(k_idx)
        return x, q_idx

    def forward_cross(self, x: torch.Tensor, positions: torch.Tensor, attention: CrossAttention,
                      cache: KVCache, l2_next: bool = False, rope: Rope | None = None) -> torch.Tensor:
        """The cross-decoder for one token per sequence. x: [B, D], positions: [B]. The caller has
        planned `attention` for this step; every layer runs it on the same plan. `l2_next`: each
        layer's attention asks L2 for its output projection's weight (`CrossAttention.run`).
        `rope`: the positions' rotation, when the caller has it already (the self layers' own)."""
        h = x[:, None]
        # RoPE's angles only where the cross queries rotate (`cross_rope`): else a few kernels a step for nothing
        if not self.cfg.cross_rope:
            rope_or_pos: Rope | torch.Tensor = positions[:, None]
        else:
            rope_or_pos = rope if rope is not None else rope_angles(positions[:, None], self.cfg.head_dim,
                                                                    self.cfg.rope_theta)
        for layer in self.cross_decoder:
            q = layer.query(h, rope_or_pos)[:, 0]
            out = attention.run(q, cache.k[0], cache.v[0], layer.wo.weight if l2_next else None)
            h = layer.finish(h, out[:, None])
        return h[:, 0]

    def _self_decoder(self, x: torch.Tensor, ctx: StepContext, cache: KVCache, rope: Rope) -> torch.Tensor:
        """Sliding-window layers: keys are the ring buffer (tokens before the chunk) plus the chunk.
        On a GPU prefill chunks go through the window kernel (`kernels.window_attention`): a
        first chunk over itself, a later one behind the ring's W rows in position order (every
        sequence of a prefill chunk starts at the same position), the queries rotated inside it
        (`WINDOW_ROPE`)."""
        window = self.cfg.swa_window
        # The prompt's first chunk: the ring is empty, so the window lies inside the chunk and
        # needs no [C, W + C] mask (16 GB of it for a 128K-token chunk).
        fresh = ctx.chunk_start == 0 and ctx.positions.shape[1] > 1
        kernel = ctx.chunk_start is not None and use_window_kernel(x.device, self.cfg.head_dim)  # prefill, GPU
        behind_ring = kernel and not fresh
        if behind_ring:
            start = ctx.chunk_start or 0
            # Ring rows of positions start - W .. start - 1, oldest first; those before 0 are not there.
            order = (torch.arange(start - window, start, device=x.device) % window)[None, :]
            key_start = max(0, window - start)
        elif not fresh:
            ring_pos = cache.swa_pos[ctx.slots]  # [B, W]
            key_pos = torch.cat([ring_pos, ctx.positions], dim=1)[:, None, :]
            q_pos = ctx.positions[:, :, None]
            mask = (key_pos >= 0) & (key_pos <= q_pos) & (q_pos - key_pos < window)
        ring_slots = ctx.slots[ctx.ring_b]
        ring_rows = ctx.positions[ctx.ring_b, ctx.ring_c] % window
        in_kernel = kernel and WINDOW_ROPE  # q's RoPE inside the window kernel
        q_rope = (rope.cos, rope.sin) if in_kernel else None
        for i, layer in enumerate(self.own_kv_layers):
            q, k, v = layer.qkv(x, rope, rotate_q=not in_kernel)
            if fresh and kernel:
                attn = window_attention(q, k, v, window, self.sm_scale, backend=WINDOW_BACKEND, q_rope=q_rope)
            elif fresh:
                attn = sliding_window_attention(q, k, v, window, self.sm_scale)
            elif behind_ring:
                keys = torch.cat([cache.swa_k[i][ctx.slots[:, None], order], k], dim=1)
                values = torch.cat([cache.swa_v[i][ctx.slots[:, None], order], v], dim=1)
                attn = window_attention(q, keys, values, window, self.sm_scale, q_offset=window, key_start=key_start,
                                        backend=WINDOW_BACKEND, q_rope=q_rope)
            else:
                keys = torch.cat([cache.swa_k[i, ctx.slots], k], dim=1)
                values = torch.cat([cache.swa_v[i, ctx.slots], v], dim=1)
                attn = masked_attention(q, keys, values, mask, self.sm_scale)
            x = layer.finish(x, attn)
            cache.swa_k[i, ring_slots, ring_rows] = k[ctx.ring_b, ctx.ring_c]
            cache.swa_v[i, ring_slots, ring_rows] = v[ctx.ring_b, ctx.ring_c]
        cache.swa_pos[ring_slots, ring_rows] = ctx.positions[ctx.ring_b, ctx.ring_c]
        return x

    def _global_attention(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          ctx: StepContext) -> torch.Tensor:
        """Transformer layers: causal attention over the layer's paged cache (chunk already written)."""
        if q.shape[1] == 1:
            out = dense_decode_attention(q[:, 0], k_cache, v_cache, ctx.block_table, ctx.seq_lens, self.sm_scale)
            return out[:, None]
        max_len = int(ctx.seq_lens.max())
        key_pos = torch.arange(max_len, device=q.device).expand(q.shape[0], max_len)
        keys = gather_tokens(k_cache, ctx.block_table, key_pos)
        values = gather_tokens(v_cache, ctx.block_table, key_pos)
        mask = (key_pos[:, None, :] <= ctx.positions[:, :, None]) & (key_pos < ctx.seq_lens[:, None])[:, None, :]
        return masked_attention(q, keys, values, mask, self.sm_scale)
