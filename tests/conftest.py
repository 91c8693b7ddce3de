"""Shared fixtures: small models whose window, block size and k are tiny, so that short prompts
cross block, chunk and window boundaries and the sparse path really drops positions."""

from __future__ import annotations

import dataclasses
import os

# Triton kernels run on CPU tensors through Triton's interpreter; it must be set before any kernel
# module is imported. The interpreter gets bf16 arithmetic wrong, so kernel tests use fp32/fp16.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from services.engine import EngineConfig, LLMEngine, ModelConfig
from services.engine.model import CLSAModel
from services.engine.tokenizer import ByteTokenizer

SMALL = ModelConfig(
    vocab_size=259, d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=128,
    swa_window=8, index_dim=16, index_topk=6, max_seq_len=256,
)


def make_model(cfg: ModelConfig = SMALL, seed: int = 0) -> CLSAModel:
    model = CLSAModel(cfg)
    model.init_weights(seed)
    # Random init at std 0.02 leaves attention nearly uniform; sharper weights make the tests see
    # a wrong mask or a wrong position.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("wq.weight", "wk.weight", "wq_idx.weight", "wk_idx.weight")):
                p.mul_(10.0)
    model.fingerprint = f"test-{seed}"
    return model.eval()


def make_engine(cfg: ModelConfig = SMALL, seed: int = 0, **engine_kwargs: object) -> LLMEngine:
    defaults: dict[str, object] = {"block_size": 4, "num_blocks": 256, "prefill_chunk": 5, "max_num_seqs": 8}
    defaults.update(engine_kwargs)
    return LLMEngine(make_model(cfg, seed), ByteTokenizer(), EngineConfig(**defaults))  # type: ignore[arg-type]


def variant(**changes: object) -> ModelConfig:
    return dataclasses.replace(SMALL, **changes)  # type: ignore[arg-type]


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def ray_session():  # noqa: ANN201
    """One local Ray for the whole test session (the service and the fault-injection suites share
    it, each deployment in its own namespace). A small object store: bundles of the tiny model are
    ~100 KB. Its raylet has been seen to miss Ray's fixed 30 s start-up window on a loaded 2-core
    machine: try again."""
    import ray

    from services.gateway.ray_backend import NAMESPACE

    for attempt in range(1, 4):
        try:
            ray.init(num_cpus=2, include_dashboard=False, namespace=NAMESPACE, logging_level="ERROR",
                     log_to_driver=False, object_store_memory=256 * 1024 * 1024)
            break
        except Exception:
            ray.shutdown()
            if attempt == 3:
                raise
    yield ray
    ray.shutdown()
