"""The engine loop: requests in, token outputs out. No network, no Ray.

    engine = LLMEngine.from_model("clsa-tiny")
    [out] = engine.generate(["hello"], SamplingParams(max_tokens=8, temperature=0))
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from kernels._backend import BACKENDS, Backend
from services.engine.attention import CROSS_POLICIES
from services.engine.block_manager import BlockManager
from services.engine.bundle import KVBundle, export_bundle, import_bundle
from services.engine.cache import KVCache
from services.engine.checkpoint import load_model
from services.engine.errors import InvalidRequestError, NoRoomNowError, OutOfBlocksError
from services.engine.model import CLSAModel
from services.engine.runner import ModelRunner
from services.engine.sampling import Sampler, SamplingParams
from services.engine.scheduler import Scheduler
from services.engine.sequence import FinishReason, Sequence, SequenceStatus
from services.engine.tokenizer import Tokenizer, load_tokenizer

AttentionName = Literal["clsa", "dense"]
MiB = 1 << 20
# With kv_cache_bytes=None, the KV pool takes this share of the GPU memory free after the weights;
# the rest is for activations, the kernels' workspaces and the decode graphs.
KV_FREE_FRACTION = 0.85


def free_device_bytes(device: torch.device) -> int:
    """KV_FREE_FRACTION of the free memory of a CUDA device (what kv_cache_bytes=None sizes from)."""
    if device.type != "cuda":
        raise ValueError(f"EngineConfig: kv_cache_bytes=None sizes the KV pool from free GPU memory; the model is "
                         f"on {device.type}: give kv_cache_bytes or num_blocks")
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(device)
    return int(free * KV_FREE_FRACTION)


@dataclass(frozen=True)
class EngineConfig:
    """Sizes and policies of one engine. `num_blocks=None` sizes the KV pool from
    `kv_cache_bytes`, and `kv_cache_bytes=None` from the GPU's free memory (`KV_FREE_FRACTION` of
    what is free once the weights are loaded; CUDA only); `index_topk=None` takes the model's k."""

    block_size: int = 16
    num_blocks: int | None = None
    kv_cache_bytes: int | None = 256 * MiB
    max_num_seqs: int = 16
    prefill_chunk: int = 512
    # The most prompt tokens one prefill step takes in (None: every prompt admitted at once);
    # a prompt longer than this still runs, alone, in chunks of `prefill_chunk`.
    max_prefill_tokens: int | None = None
    index_topk: int | None = None
    attention_backend: Backend = "auto"
    seed: int | None = None
    # Decode through CUDA graphs (one per batch bucket, services/engine/graph_step.py) on CUDA.
    cuda_graphs: bool = True
    # How the cross layers select: "shared" (CLSA: one top-k per step, our kernels); the
    # benchmark baselines "per_layer" (a top-k in every layer) and "torch_gather" (plain torch).
    cross_attention: str = "shared"

    def __post_init__(self) -> None:
        for name in ("block_size", "kv_cache_bytes", "max_num_seqs", "prefill_chunk"):
            if name == "kv_cache_bytes" and self.kv_cache_bytes is None:
                continue
            if getattr(self, name) < 1:
                raise ValueError(f"EngineConfig: {name} must be >= 1, got {getattr(self, name)}")
        if self.max_prefill_tokens is not None and self.max_prefill_tokens < 1:
            raise ValueError(f"EngineConfig: max_prefill_tokens must be >= 1, got {self.max_prefill_tokens}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"EngineConfig: num_blocks must be >= 1, got {self.num_blocks}")
        if self.index_topk is not None and self.index_topk < 1:
            raise ValueError(f"EngineConfig: index_topk must be >= 1, got {self.index_topk}")
        if self.attention_backend not in BACKENDS:
            raise ValueError(f"EngineConfig: attention_backend must be one of {BACKENDS}")
        if self.cross_attention not in CROSS_POLICIES:
            raise ValueError(f"EngineConfig: cross_attention must be one of {CROSS_POLICIES}, "
                             f"got {self.cross_attention!r}")


@dataclass
class RequestOutput:
    """What one step produced for one request; the last one has `finish_reason` set.

    A stream's tokens and text are its outputs' `new_token_ids` and `text_delta`, in order. The
    whole output (`token_ids`, `text`) rides on the last one only: carried on every step, it made
    each token cost O(tokens so far) - copied in the engine, pickled through Ray by a decode worker."""

    request_id: str
    prompt_tokens: int
    token_ids: list[int]  # every token generated: on the finished output, empty before
    new_token_ids: list[int]
    text: str  # the whole text (stop strings excluded): on the finished output, "" before
    text_delta: str
    finish_reason: FinishReason | None
    # Stage times in ms a serving layer measured ("queue", "prefill", "transfer"); empty in-process.
    stage_ms: dict[str, float] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class LLMEngine:
    def __init__(self, model: CLSAModel, tokenizer: Tokenizer, config: EngineConfig | None = None) -> None:
        self.config = config or EngineConfig()
        self.model = model
        self.model_config = model.cfg
        self.tokenizer = tokenizer
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        num_blocks = self.config.num_blocks
        if num_blocks is None:
            kv_bytes = self.config.kv_cache_bytes
            if kv_bytes is None:
                kv_bytes = free_device_bytes(self.device)
            per_block = self.model_config.kv_bytes_per_token(param.element_size()) * self.config.block_size
            num_blocks = max(1, kv_bytes // per_block)
        graphs = self.config.cuda_graphs and self.device.type == "cuda"
        self._reserved_blocks = int(graphs)
        # With graphs, one more block and ring slot: the padding rows' (DecodeGraphs).
        self.cache = KVCache(self.model_config, num_blocks + graphs, self.config.block_size,
                             self.config.max_num_seqs + graphs, self.device, self.dtype)
        self.block_manager = BlockManager(self.cache)
        self.scheduler = Scheduler(self.block_manager, self.config.max_num_seqs, self.config.max_prefill_tokens)
        self.index_topk = self.config.index_topk or self.model_config.index_topk
        self.runner = ModelRunner(model, self.cache, self.index_topk, self.config.prefill_chunk,
                                  self.config.attention_backend, self.config.max_num_seqs if graphs else 0,
                                  self.config.cross_attention)
        self.sampler = Sampler(self.device, self.config.seed)
        self._requests: dict[str, Sequence] = {}
        self._ids = itertools.count()

    @classmethod
    def from_model(cls, spec: str, config: EngineConfig | None = None, device: str = "cpu",
                   dtype: torch.dtype | None = None) -> LLMEngine:
        """A preset name (random weights, fixed seed) or a checkpoint directory."""
        dtype = dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
        model, directory = load_model(spec, device=device, dtype=dtype)
        tokenizer = load_tokenizer(Path(directory) if directory else None, model.cfg.eos_token_id)
        return cls(model, tokenizer, config)

    @property
    def fingerprint(self) -> str:
        return self.model.fingerprint

    # ---- requests --------------------------------------------------------------------------

    def add_request(self, prompt: str | Seq[int], params: SamplingParams | None = None,
                    attention: AttentionName | None = None, request_id: str | None = None) -> str:
        """Queue a request; returns its id. Raises InvalidRequestError naming the bad parameter,
        OutOfBlocksError when it could never fit in the KV pool."""
        seq = self._new_sequence(prompt, params, attention, request_id)
        self._requests[seq.request_id] = seq
        self.scheduler.add(seq)
        return seq.request_id

    def prefill_to_bundle(self, prompt: str | Seq[int], params: SamplingParams | None = None,
                          attention: AttentionName | None = None,
                          request_id: str | None = None) -> tuple[RequestOutput, KVBundle | None]:
        """Prefill one request outside the decode loop (a prefill worker's job): its first token,
        and the bundle a decode engine continues from (None when the first token finished it).
        Its blocks are free again when this returns."""
        seq = self._new_sequence(prompt, params, attention, request_id)
        self._admit_now(seq)
        try:
            self.block_manager.grow(seq, len(seq.prompt_ids))
            logits = self.runner.prefill([seq])
            [token] = self.sampler.sample(logits, [seq.params], [seq.generator])
            seq.append(token)
            output = self._output(seq, token)
            bundle = None
            if seq.finish_reason is None:
                bundle = export_bundle(self.cache, seq.block_ids, seq.slot, seq.prompt_ids, token, self.fingerprint)
                bundle.rng_state = seq.generator.get_state() if seq.generator is not None else None
        finally:
            self.block_manager.release(seq)
            seq.status = SequenceStatus.FINISHED
        return output, bundle

    def add_bundle(self, bundle: KVBundle, params: SamplingParams | None = None,
                   attention: AttentionName | None = None, request_id: str | None = None) -> str:
        """Continue a request another engine prefilled (a decode worker's job); its next tokens
        come from `step()`. Refuses a bundle of another model; raises OutOfBlocksError when the
        pool cannot take it now."""
        if bundle.fingerprint != self.fingerprint:
            raise InvalidRequestError(
                "bundle", f"made by model {bundle.fingerprint}, this engine serves {self.fingerprint}: refused")
        seq = self._new_sequence(bundle.prompt_ids, params, attention, request_id)
        self._admit_now(seq)
        try:
            self.block_manager.grow(seq, bundle.n_tokens)
            import_bundle(self.cache, bundle, seq.block_ids, seq.slot)
        except Exception:
            self.block_manager.release(seq)
            raise
        if seq.generator is not None and bundle.rng_state is not None:
            seq.generator.set_state(bundle.rng_state)  # continue the prefill side's random stream
        seq.append(bundle.first_token)
        seq.take_text_delta()  # the prefill side already streamed the first token's text
        self._requests[seq.request_id] = seq
        self.scheduler.running.append(seq)
        return seq.request_id

    def _new_sequence(self, prompt: str | Seq[int], params: SamplingParams | None, attention: AttentionName | None,
                      request_id: str | None) -> Sequence:
        """A validated sequence; raises InvalidRequestError or OutOfBlocksError (never fits)."""
        params = params or SamplingParams()
        prompt_ids = self._prompt_ids(prompt)
        sparse = self._attention_is_sparse(attention)
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self._requests:
            raise InvalidRequestError("request_id", f"{request_id!r} is already in flight")
        seq = Sequence.create(request_id, prompt_ids, params, sparse, self.model_config.max_seq_len,
                              self.tokenizer, self.sampler.make_generator(params.seed))
        need = self.block_manager.blocks_for(seq.max_total_tokens)
        pool = self.cache.num_blocks - self._reserved_blocks
        if need > pool:
            raise OutOfBlocksError(
                f"request {request_id} needs {need} KV blocks ({len(prompt_ids)} prompt + up to "
                f"{seq.max_total_tokens - len(prompt_ids)} new tokens); the pool has {pool}"
            )
        return seq

    def _admit_now(self, seq: Sequence) -> None:
        """Take blocks and a ring slot for `seq` at once, outside the scheduler's queue."""
        if not self.block_manager.can_admit(seq):
            raise NoRoomNowError(
                f"request {seq.request_id}: no room now ({self.block_manager.num_available_blocks} KV blocks "
                f"available, {self.cache.slots.num_free} sequence slots free); retry when requests finish")
        self.block_manager.admit(seq)
        seq.status = SequenceStatus.RUNNING

    def abort_request(self, request_id: str) -> None:
        """Stop a request and free everything it holds; unknown or finished ids are ignored."""
        seq = self._requests.pop(request_id, None)
        if seq is not None:
            seq.abort()
            self.scheduler.finish(seq)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.num_unfinished > 0

    # ---- the loop --------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Prefill newly admitted requests, or decode one token for every running one."""
        kind, seqs = self.scheduler.schedule()
        if kind == "idle":
            return []
        if kind == "prefill":
            for seq in seqs:
                self.block_manager.grow(seq, len(seq.prompt_ids))
            logits = self.runner.prefill(seqs)
        else:
            for seq in seqs:
                self.block_manager.grow(seq, seq.num_tokens)
            logits = self.runner.decode(seqs)
        tokens = self.sampler.sample(logits, [s.params for s in seqs], [s.generator for s in seqs])
        outputs = []
        for seq, token in zip(seqs, tokens):
            seq.append(token)
            outputs.append(self._output(seq, token))
            if seq.finish_reason is not None:
                self.scheduler.finish(seq)
                del self._requests[seq.request_id]
        return outputs

    @staticmethod
    def _output(seq: Sequence, token: int) -> RequestOutput:
        done = seq.finish_reason is not None
        return RequestOutput(
            request_id=seq.request_id, prompt_tokens=len(seq.prompt_ids),
            token_ids=list(seq.output_ids) if done else [], new_token_ids=[token], text=seq.text if done else "",
            text_delta=seq.take_text_delta(), finish_reason=seq.finish_reason,
        )

    def generate(self, prompts: Seq[str | Seq[int]], params: SamplingParams | None = None,
                 attention: AttentionName | None = None) -> list[RequestOutput]:
        """Run prompts to completion; returns the final output of each, in order."""
        ids = [self.add_request(p, params, attention) for p in prompts]
        final: dict[str, RequestOutput] = {}
        while self.has_unfinished_requests():
            for out in self.step():
                if out.finished:
                    final[out.request_id] = out
        return [final[i] for i in ids]

    # ---- validation ------------------------------------------------------------------------

    def _prompt_ids(self, prompt: str | Seq[int]) -> list[int]:
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        vocab, max_len = self.model_config.vocab_size, self.model_config.max_seq_len
        if not ids:
            raise InvalidRequestError("prompt", "is empty")
        bad = [t for t in ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError("prompt", f"token id {bad[0]!r} outside the vocabulary [0, {vocab})")
        if len(ids) >= max_len:
            raise InvalidRequestError(
                "prompt", f"has {len(ids)} tokens; the model's max_seq_len is {max_len} and at least "
                          "one token must be generated")
        return ids

    def _attention_is_sparse(self, attention: AttentionName | None) -> bool:
        if attention not in (None, "clsa", "dense"):
            raise InvalidRequestError("attention", f"must be 'clsa' or 'dense', got {attention!r}")
        if not self.model_config.is_yoco:
            if attention == "clsa":
                raise InvalidRequestError("attention", "'clsa' needs a YOCO model; this one is a transformer")
            return False
        return attention != "dense"
