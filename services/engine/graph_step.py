"""The decode step over fixed-shape buffers, and one CUDA graph of it per batch bucket.

`StaticDecodeStep` is `ModelRunner.decode` for one attention mode, written so that nothing in it
depends on the data: inputs live in preallocated device buffers that `load()` fills, the step
never reads a value back to the host, and every tensor has the bucket's shape - so a CUDA graph
can capture it once and replay it every step. A batch smaller than its bucket is padded with rows
that write their K/V into a reserved block and ring-buffer slot (`DecodeGraphs` holds them) and
whose logits are dropped.

`DecodeGraphs` keeps one step per (bucket, mode), captured on first use on CUDA (eager on other
devices, which is how the CPU tests check it against the eager runner), and splits a batch that
mixes CLSA and DENSE sequences into one replay per mode. Sampling stays outside the graph.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kernels import dense_decode_attention, l2_persist
from kernels._backend import Backend
from services.engine import layers
from services.engine.attention import make_cross_attention
from services.engine.cache import KVCache
from services.engine.layers import Rope, rope_angles, rope_inv_freq
from services.engine.model import CLSAModel
from services.engine.sequence import Sequence

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# Each self layer's q/k/v projection, RoPE and ring-buffer writes as one kernel
# (`AttentionLayer.qkv_into_rings`) where the skinny GEMM takes the batch. Measured on the H200
# (bench/decode.py [--no-fused-qkv], 128K): B=1 2.589 -> 2.457 ms, B=7 3.165 -> 3.013 ms.
FUSED_QKV_RING = True
# The fused kernel writes the token's ring row at its end and lets the ring attention start before
# it ends (PDL). True: the attention reads the rest of the ring before its wait and that one row
# after (`dense_decode_attention(fresh=...)`); False: the whole ring after its wait. Off until the
# card has run it: built and tested interpreted on 2026-12-07, when no GPU could be had; the
# compiled check is bench/ring_race.py --check (its "fresh row" way), the timing an A/B of this.
RING_FRESH_ROW = False
# Each layer's attention kernel (the rings', the sparse one) asks L2 for the layer's output
# projection weight while it runs, so the projection after it reads it from L2
# (`dense_decode_attention(l2_next=...)`, kernels/triton_attention.py's L2_NEXT_AT).
L2_NEXT_WEIGHT = False
# With kernels.decode_attention.GATHER_SELECTED, each captured CLSA step keeps its compact copy of
# the selected K/V rows in L2 across the cross layers: an access-policy window over the copy on
# every kernel node of the graph, in a persisting-L2 set-aside of the device's maximum for this
# process (kernels/l2_persist.py). Off: +3.3% at B = 7, +2.2% at B = 1 on an H100 (the set-aside
# takes 31 of its 50 MiB of L2 from the rest of the step; docs/performance.md).
L2_PERSIST_SELECTED = False
STAGES = ("self", "index", "cross", "logits")  # where `StaticDecodeStep.run(upto=...)` may stop


class SlotTables:
    """Every ring slot's block table, kept on the device between steps: [slots, max_blocks] int32,
    unused entries pointing at `trash_block`. A step gathers its rows by slot inside the graph, and
    `sync()` copies only what changed since the last step - a sequence's new blocks (one every
    block_size tokens) or a slot's new owner - so the host work of a step does not grow with the
    context (a 128K-token sequence holds 8K blocks)."""

    def __init__(self, n_slots: int, max_blocks: int, trash_block: int, device: torch.device) -> None:
        self.max_blocks, self.trash_block = max_blocks, trash_block
        self.table = torch.full((n_slots, max_blocks), trash_block, dtype=torch.int32, device=device)
        self._known: dict[int, tuple[int, str, int, int]] = {}  # slot -> (id(seq), request_id, blocks, last block)

    @classmethod
    def for_cache(cls, cache: KVCache, max_seq_len: int, trash_block: int) -> SlotTables:
        """Tables for every slot of `cache`, wide enough for `max_seq_len` tokens."""
        return cls(cache.slots.capacity, -(-max_seq_len // cache.block_size), trash_block, cache.k.device)

    def sync(self, seqs: list[Sequence]) -> None:
        for seq in seqs:
            n = len(seq.block_ids)
            if not 0 <= seq.slot < self.table.shape[0]:
                raise ValueError(f"SlotTables: sequence {seq.request_id} has no ring slot ({seq.slot})")
            if n > self.max_blocks:
                raise ValueError(f"SlotTables: sequence {seq.request_id} holds {n} blocks, over the table "
                                 f"width {self.max_blocks}")
            known = self._known.get(seq.slot)
            start = 0
            if known is not None and known[:2] == (id(seq), seq.request_id) and known[2] <= n and (
                    known[2] == 0 or seq.block_ids[known[2] - 1] == known[3]):
                start = known[2]  # the same sequence, grown: only its new blocks
            else:
                self.table[seq.slot].fill_(self.trash_block)
            if n > start:
                self.table[seq.slot, start:n].copy_(torch.tensor(seq.block_ids[start:n], dtype=torch.int32),
                                                    non_blocking=True)
            self._known[seq.slot] = (id(seq), seq.request_id, n, seq.block_ids[n - 1] if n else -1)


def buckets_up_to(max_batch: int, buckets: tuple[int, ...] = DEFAULT_BUCKETS) -> tuple[int, ...]:
    """The buckets a batch of up to `max_batch` sequences needs: those below it, then `max_batch`."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    return tuple(b for b in buckets if b < max_batch) + (max_batch,)


class StaticDecodeStep:
    """One decode step of `batch` rows in one attention mode (`sparse`: CLSA, else DENSE), over
    buffers allocated once. `load(seqs)` fills them (len(seqs) <= batch; the rest is padding
    aimed at `trash_block` and `spare_slot`); `run()` returns logits [batch, V]."""

    def __init__(self, model: CLSAModel, cache: KVCache, batch: int, sparse: bool, index_topk: int,
                 trash_block: int, spare_slot: int, backend: Backend = "auto", policy: str = "shared",
                 max_seq_len: int | None = None, tables: SlotTables | None = None) -> None:
        """`max_seq_len` (default: the model's) sizes the block table, which bounds the dense
        kernel's split grid and the torch baseline's scoring: a benchmark at one context length
        sets it to that length. `tables`: the slots' block tables, shared by the steps of one
        `DecodeGraphs` (default: this step's own)."""
        self.model, self.cache, self.batch, self.sparse = model, cache, batch, sparse
        self.index_topk, self.backend = index_topk, backend
        self.trash_block, self.spare_slot = trash_block, spare_slot
        device = cache.k.device
        self.tables = tables or SlotTables.for_cache(cache, max_seq_len or model.cfg.max_seq_len, trash_block)
        self.max_blocks = self.tables.max_blocks
        # The step's inputs, two buffers filled by one copy each (`load`): tokens, positions, the
        # new rows in the paged cache, slots and ring rows; the lengths, the ring tables and lengths.
        self._longs = torch.zeros(5, batch, dtype=torch.long, device=device)
        self._ints = torch.ones(3, batch, dtype=torch.int32, device=device)
        self.tokens, self.positions, self.write_rows, self.slots, self.ring_rows = self._longs.unbind(0)
        self.seq_lens, ring_table, self.ring_lens = self._ints.unbind(0)
        self.ring_table = ring_table[:, None]  # [B, 1]: each slot's ring is one block of W rows
        self.inv_freq = rope_inv_freq(model.cfg.head_dim, model.cfg.rope_theta, device)
        self.attention = make_cross_attention(policy, model.sm_scale, backend)
        # The dense kernels' scratch for this step's fixed shapes, kept across layers and replays
        # (no zero-fill launch between the PDL launches of a layer chain): the ring layers', the
        # Transformer's and DENSE cross layers'.
        self.dense_workspace: dict = {}
        self.attention.dense_workspace = self.dense_workspace

    def load(self, seqs: list[Sequence]) -> None:
        """Copy the step's inputs for `seqs` (each to decode its last token) into the buffers; no
        sequences: padding only (what a capture runs on, so that it changes no sequence's state)."""
        n, bs = len(seqs), self.cache.block_size
        if not 0 <= n <= self.batch:
            raise ValueError(f"StaticDecodeStep: {n} sequences for a bucket of {self.batch}")
        if any(s.sparse != self.sparse for s in seqs):
            raise ValueError("StaticDecodeStep: every sequence must use this step's attention mode")
        longs = torch.zeros(5, self.batch, dtype=torch.long)
        tokens, positions, rows, slots, ring_rows = longs.unbind(0)
        rows.fill_(self.trash_block * bs)
        slots.fill_(self.spare_slot)
        for i, s in enumerate(seqs):
            pos = s.num_tokens - 1
            if len(s.block_ids) * bs <= pos:  # (the table's width is SlotTables.sync's to check)
                raise ValueError(f"StaticDecodeStep: sequence {s.request_id} holds {len(s.block_ids)} blocks "
                                 f"for position {pos}")
            tokens[i], positions[i], slots[i] = s.last_token, pos, s.slot
            rows[i] = s.block_ids[pos // bs] * bs + pos % bs
        window = self.model.cfg.swa_window
        ring_rows.copy_(positions % window)  # the token's row of its ring
        lens = positions + 1
        ints = torch.stack([lens, slots, torch.clamp(lens, max=window)]).to(torch.int32)
        self.tables.sync(seqs)
        self._longs.copy_(longs, non_blocking=True)
        self._ints.copy_(ints, non_blocking=True)

    def run(self, upto: str = "logits") -> torch.Tensor:
        """The step -> logits [batch, V]. `upto` stops it early, for a benchmark's breakdown
        (`STAGES`): after the self layers ("self"; the transformer's every layer), after the
        shared K/V and the indexer's plan ("index"), after the cross layers ("cross")."""
        if upto not in STAGES:
            raise ValueError(f"StaticDecodeStep.run: upto must be one of {STAGES}, got {upto!r}")
        model, cache = self.model, self.cache
        pos = self.positions
        block_table = self.tables.table.index_select(0, self.slots)  # padding rows: the spare slot's, all trash
        x = model.embed(self.tokens)[:, None]  # [B, 1, D]
        rope = rope_angles(pos[:, None], model.cfg.head_dim, model.cfg.rope_theta, self.inv_freq)  # once a step
        if model.shared is None:  # the transformer baseline: every layer global over its own cache
            for i, layer in enumerate(model.own_kv_layers):
                q, k, v = layer.qkv(x, rope)
                self._write(cache.k[i], k[:, 0])
                self._write(cache.v[i], v[:, 0])
                out = dense_decode_attention(q[:, 0], cache.k[i], cache.v[i], block_table, self.seq_lens,
                                             model.sm_scale, backend=self.backend, workspace=self.dense_workspace)
                x = layer.finish(x, out[:, None])
            return x[:, 0] if upto != "logits" else model.logits(x[:, 0])
        x = self._self_decoder(x, rope)
        if upto == "self":
            return x[:, 0]
        k, v, k_idx, q_idx = model.shared(x, rope)
        self._write(cache.k[0], k[:, 0])
        self._write(cache.v[0], v[:, 0])
        self._write(cache.k_idx, k_idx[:, 0])
        self.attention.plan(q_idx[:, 0], cache.k_idx, block_table, self.seq_lens, [self.sparse] * self.batch,
                            self.index_topk, kv=(cache.k[0], cache.v[0]))
        if upto == "index":
            return x[:, 0]
        h = model.forward_cross(x[:, 0], pos, self.attention, cache, l2_next=L2_NEXT_WEIGHT, rope=rope)
        return h if upto == "cross" else model.logits(h)

    def _write(self, paged: torch.Tensor, rows: torch.Tensor) -> None:
        """The new token's row of each sequence into a paged cache [num_blocks, block_size, ...]."""
        paged.view(-1, *paged.shape[2:]).index_copy_(0, self.write_rows, rows.to(paged.dtype))

    def _self_decoder(self, x: torch.Tensor, rope: Rope) -> torch.Tensor:
        """The sliding-window layers for one token. The token's K/V go into its ring row first;
        then the ring rows 0 .. min(pos + 1, W) - 1 hold exactly its window (positions pos - W + 1
        .. pos, or 0 .. pos early on), so each layer is the dense decode kernel over the ring seen
        as a paged cache with one block of W rows per slot - no gather, no mask."""
        model, cache = self.model, self.cache
        pos, slots = self.positions, self.slots
        ring_rows, ring_table, ring_lens = self.ring_rows, self.ring_table, self.ring_lens  # (`load`'s)
        for i, layer in enumerate(model.own_kv_layers):
            fused = FUSED_QKV_RING and layer.fused is not None and layers.use_skinny(x, layer.fused)
            if fused:
                q = layer.qkv_into_rings(x, rope, cache.swa_k[i], cache.swa_v[i], slots, ring_rows)
            else:
                q, k, v = layer.qkv(x, rope)
                cache.swa_k[i, slots, ring_rows] = k[:, 0]
                cache.swa_v[i, slots, ring_rows] = v[:, 0]
            # The fused kernel lets the attention start before it ends (PDL) and writes the ring
            # last: the attention must not read the token's own row before its wait, or it may
            # still be the one W steps back (RING_FRESH_ROW).
            out = dense_decode_attention(q[:, 0], cache.swa_k[i], cache.swa_v[i], ring_table, ring_lens,
                                         model.sm_scale, backend=self.backend, workspace=self.dense_workspace,
                                         kv_before_wait=not fused or RING_FRESH_ROW,
                                         fresh=ring_rows if fused and RING_FRESH_ROW else None,
                                         l2_next=layer.wo.weight if L2_NEXT_WEIGHT else None)
            x = layer.finish(x, out[:, None])
        cache.swa_pos[slots, ring_rows] = pos
        return x


class DecodeGraphs:
    """Decode steps per (bucket, attention mode), each a CUDA graph on CUDA (captured on first
    use into one shared memory pool), eager elsewhere. Takes one KV block and one ring-buffer
    slot from `cache` for the padding rows; `close()` gives them back."""

    def __init__(self, model: CLSAModel, cache: KVCache, index_topk: int, max_batch: int,
                 backend: Backend = "auto", capture: bool | None = None, policy: str = "shared",
                 max_seq_len: int | None = None, buckets: tuple[int, ...] | None = None) -> None:
        """`buckets`: the batch sizes to capture (default `buckets_up_to(max_batch)`); `policy`
        and `max_seq_len` as `StaticDecodeStep`'s."""
        self.model, self.cache, self.index_topk, self.backend = model, cache, index_topk, backend
        self.policy, self.max_seq_len = policy, max_seq_len
        make_cross_attention(policy, model.sm_scale, backend)  # a bad policy fails here, not at first decode
        self.buckets = tuple(sorted(set(buckets))) if buckets else buckets_up_to(max_batch)
        if self.buckets[0] < 1:
            raise ValueError(f"DecodeGraphs: buckets must be >= 1, got {self.buckets}")
        self.capture = cache.k.device.type == "cuda" if capture is None else capture
        [self.trash_block] = cache.blocks.allocate(1)
        [self.spare_slot] = cache.slots.allocate(1)
        self.tables = SlotTables.for_cache(cache, max_seq_len or model.cfg.max_seq_len, self.trash_block)
        self._steps: dict[tuple[int, bool, str],
                          tuple[StaticDecodeStep, torch.cuda.CUDAGraph | None, torch.Tensor | None]]
        self._steps = {}
        self._pool = torch.cuda.graph_pool_handle() if self.capture else None
        self._persisting = 0  # bytes of L2 set aside for the selected rows' windows

    def close(self) -> None:
        self._steps.clear()
        if self._persisting:
            l2_persist.reset(self.cache.k.device)
            l2_persist.set_aside(self.cache.k.device, 0)
            self._persisting = 0
        self.cache.blocks.free([self.trash_block])
        self.cache.slots.free([self.spare_slot])

    def bucket(self, n: int) -> int:
        for b in self.buckets:
            if n <= b:
                return b
        raise ValueError(f"DecodeGraphs: batch of {n} over the largest bucket {self.buckets[-1]}")

    @torch.inference_mode()
    def decode(self, seqs: list[Sequence]) -> torch.Tensor:
        """One step for `seqs` -> logits [len(seqs), V], in the order given."""
        if not seqs:
            raise ValueError("DecodeGraphs: decode of an empty batch")
        out: torch.Tensor | None = None
        for sparse in (True, False):
            idx = [i for i, s in enumerate(seqs) if s.sparse == sparse]
            for start in range(0, len(idx), self.buckets[-1]):
                part = idx[start:start + self.buckets[-1]]
                logits = self._replay([seqs[i] for i in part], sparse)[: len(part)]
                if len(part) == len(seqs):
                    return logits.clone()  # the graph's output buffer is overwritten by the next replay
                if out is None:
                    out = logits.new_empty(len(seqs), logits.shape[-1])
                out[torch.tensor(part, device=logits.device)] = logits
        assert out is not None
        return out

    def _replay(self, seqs: list[Sequence], sparse: bool) -> torch.Tensor:
        return self.prepare(seqs, sparse)()

    def prepare(self, seqs: list[Sequence], sparse: bool, upto: str = "logits") -> Callable[[], torch.Tensor]:
        """Load `seqs` (all of mode `sparse`) into their bucket's step and return what runs it:
        the graph's replay (returning its static output) on CUDA, the eager step elsewhere.
        `upto` other than "logits" captures a partial step (a benchmark's breakdown)."""
        key = (self.bucket(len(seqs)), sparse, upto)
        if key not in self._steps:
            step = StaticDecodeStep(self.model, self.cache, key[0], sparse, self.index_topk, self.trash_block,
                                    self.spare_slot, self.backend, self.policy, self.max_seq_len, self.tables)
            self._steps[key] = (step, *self._capture(step, upto))
        step, graph, out = self._steps[key]
        step.load(seqs)
        if graph is None or out is None:
            return lambda: step.run(upto)
        static_out = out

        def replay() -> torch.Tensor:
            graph.replay()
            return static_out
        return replay

    def _capture(self, step: StaticDecodeStep, upto: str) -> tuple[torch.cuda.CUDAGraph | None, torch.Tensor | None]:
        """Warm the step up (Triton compiles, workspaces are allocated), then capture it, on
        padding rows only: a step is not idempotent (its token's ring-buffer row, once written,
        is read again), so it must not run on real sequences before their replay."""
        if not self.capture:
            return None, None
        step.load([])
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                step.run(upto)
        torch.cuda.current_stream().wait_stream(side)
        window = self._selected_rows_window(step)
        graph = torch.cuda.CUDAGraph(keep_graph=window is not None)
        with torch.cuda.graph(graph, pool=self._pool):
            out = step.run(upto)
        if window is not None:  # every kernel node keeps the selected rows in L2, then instantiate
            l2_persist.set_graph_window(graph.raw_cuda_graph(), window, self._persisting)
            graph.instantiate()
        return graph, out

    def _selected_rows_window(self, step: StaticDecodeStep) -> torch.Tensor | None:
        """The buffer the step's graph should keep in L2: its compact copy of the selected rows
        (L2_PERSIST_SELECTED, a step that gathers them, a device with persisting L2), with the
        set-aside made (once, at the device's maximum); None: no window."""
        device = self.cache.k.device
        buffer = step.attention.gathered if L2_PERSIST_SELECTED else None
        if buffer is None or not l2_persist.supported(device):
            return None
        if not self._persisting:
            self._persisting = l2_persist.set_aside(device, l2_persist.limits(device).max_persisting_bytes)
        return buffer if self._persisting else None
