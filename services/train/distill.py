"""`clsa distill-indexer`: teach the CLSA indexer where the cross layers look.

The recipe of the paper (after DeepSeek-V3.2's indexer warm-up): the target is the dense
attention distribution of every query over the earlier positions, averaged over all cross layers
and heads; the indexer's distribution is the softmax of its scores q_idx . k_idx over the same
positions; the loss is KL(target || indexer). Stage 1 (`steps`) trains only the indexer's two
projections with the backbone frozen. Stage 2 (`joint_steps`, optional) trains everything on
LM loss + `kl_weight` x KL, the KL's target and the indexer's input detached so that the KL
moves only the indexer and the LM loss only the backbone. The LM loss there is taken both with
dense cross attention and, as DeepSeek-V3.2's sparse training stage does, through the indexer's
top-k selection (`sparse_lm` its share; k = `joint_topk`, default seq_len / 16, the paper's
ratio), so that the backbone learns to do with the positions CLSA gives it.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from services.engine.checkpoint import load_checkpoint, save_checkpoint
from services.engine.model import CLSAModel, CrossInputs
from services.train.data import Mixer, batch_rng, training_text
from services.train.progress import progress_bar
from services.train.trainer import pick_device, weighted_lm_loss

LOG = "distill_log.jsonl"


def dense_attention_average(inputs: CrossInputs, sm_scale: float, rows: torch.Tensor | None = None) -> torch.Tensor:
    """The dense attention distribution of query positions `rows` (default: all) over every
    position, averaged over the cross layers and heads: [B, Q, T], rows summing to 1."""
    keys = inputs.keys.float()
    batch, length, n_kv, _ = keys.shape
    n_q = inputs.queries[0].shape[2]
    keys = keys.repeat_interleave(n_q // n_kv, dim=2)  # GQA: query head h reads KV head h // G
    pos = torch.arange(length, device=keys.device)
    q_pos = pos if rows is None else rows
    future = pos[None, :] > q_pos[:, None]  # [Q, T]
    total = torch.zeros(batch, len(q_pos), length, device=keys.device)
    for q in inputs.queries:
        q = q.float() if rows is None else q.float()[:, rows]
        scores = torch.einsum("bqhd,bshd->bhqs", q, keys) * sm_scale
        total += torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1).mean(dim=1)
    return total / len(inputs.queries)


def indexer_scores(model: CLSAModel, boundary: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """q_idx . k_idx of query positions `rows` (default: all) over every position: [B, Q, T] fp32,
    -inf at later positions."""
    assert model.shared is not None
    k_idx = model.shared.wk_idx(boundary).float()
    q_src = boundary if rows is None else boundary[:, rows]
    q_idx = model.shared.wq_idx(q_src).float()
    length = boundary.shape[1]
    pos = torch.arange(length, device=boundary.device)
    q_pos = pos if rows is None else rows
    scores = torch.einsum("bqd,bsd->bqs", q_idx, k_idx)
    return scores.masked_fill(pos[None, None, :] > q_pos[None, :, None], float("-inf"))


def indexer_kl(model: CLSAModel, inputs: CrossInputs) -> torch.Tensor:
    """Mean over queries of KL(dense attention average || softmax of the indexer's scores).
    Gradients reach only the indexer's projections."""
    with torch.no_grad():
        target = dense_attention_average(inputs, model.sm_scale)
    log_q = torch.log_softmax(indexer_scores(model, inputs.boundary.detach()), dim=-1)
    terms = torch.where(target > 0, target * (target.clamp_min(1e-30).log() - log_q), torch.zeros_like(target))
    return terms.sum(-1).mean()


@dataclass
class DistillConfig:
    model: str = "runs/clsa-small/checkpoint"
    out: str = "runs/clsa-small-distilled"
    steps: int = 300
    joint_steps: int = 0
    batch_size: int = 4
    seq_len: int = 2048
    lr: float = 1e-3
    joint_lr: float = 1e-4
    kl_weight: float = 0.1
    sparse_lm: float = 0.5  # joint stage: the share of the LM loss taken through the top-k selection
    joint_topk: int | None = None  # joint stage: k of that selection (None: seq_len // 16)
    corpus: list[str] = field(default_factory=list)
    max_corpus_bytes: int = 64 << 20
    passkey_frac: float = 0.2
    kv_frac: float = 0.2
    seed: int = 1
    device: str = "auto"
    log_every: int = 10
    save_dtype: str = "float32"  # "bfloat16" for a checkpoint to ship (half the bytes)
    command: str = ""


def distill(cfg: DistillConfig, progress: bool = True) -> Path:
    """Distill the indexer of cfg.model into cfg.out/checkpoint; returns that directory."""
    if cfg.save_dtype not in ("float32", "bfloat16"):
        raise ValueError(f"save_dtype must be float32 or bfloat16, got {cfg.save_dtype!r}")
    if not 0.0 <= cfg.sparse_lm <= 1.0:
        raise ValueError(f"sparse_lm must be in [0, 1], got {cfg.sparse_lm}")
    joint_topk = cfg.joint_topk or max(1, cfg.seq_len // 16)
    device = pick_device(cfg.device)
    model = load_checkpoint(cfg.model).to(device).train()
    if model.shared is None:
        raise ValueError("distill-indexer needs a YOCO model (it has an indexer)")
    if cfg.seq_len > model.cfg.max_seq_len:
        raise ValueError(f"--seq-len {cfg.seq_len} is past the model's max_seq_len {model.cfg.max_seq_len}")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    mixer = Mixer(training_text(cfg.corpus or None, cfg.max_corpus_bytes), cfg.seq_len, cfg.passkey_frac,
                  cfg.kv_frac)
    indexer = [model.shared.wq_idx.weight, model.shared.wk_idx.weight]
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast(
        "cpu", enabled=False)
    t0 = time.time()
    total = cfg.steps + cfg.joint_steps
    bar = progress_bar(range(total), disable=not progress, desc="distill", unit="step", dynamic_ncols=True)
    warm: torch.optim.Optimizer = torch.optim.AdamW(indexer, lr=cfg.lr, weight_decay=0.0)
    joint: torch.optim.Optimizer | None = None
    with (out / LOG).open("w") as log:
        for step in bar:
            stage = "indexer" if step < cfg.steps else "joint"
            samples = [mixer.sample(batch_rng(cfg.seed, step, i)) for i in range(cfg.batch_size)]
            tokens = torch.tensor([s.tokens for s in samples], dtype=torch.long, device=device)
            if stage == "indexer":
                with torch.no_grad(), autocast:
                    _, inputs = model.forward_train(tokens[:, :-1], collect=True)  # type: ignore[misc]
                kl = indexer_kl(model, inputs)
                loss, lm = kl, None
                optimizer = warm
            else:
                if joint is None:
                    joint = torch.optim.AdamW(model.parameters(), lr=cfg.joint_lr, weight_decay=0.0)
                ones = torch.ones_like(tokens[:, 1:], dtype=torch.float32)
                with autocast:
                    logits, inputs = model.forward_train(tokens[:, :-1], collect=True)  # type: ignore[misc]
                lm = (1 - cfg.sparse_lm) * weighted_lm_loss(logits, tokens[:, 1:], ones)
                if cfg.sparse_lm > 0:
                    with autocast:
                        sparse_logits = model.forward_train(tokens[:, :-1], index_topk=joint_topk)
                    sparse = weighted_lm_loss(sparse_logits, tokens[:, 1:], ones)  # type: ignore[arg-type]
                    lm = lm + cfg.sparse_lm * sparse
                kl = indexer_kl(model, inputs)
                loss = lm + cfg.kl_weight * kl
                optimizer = joint
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if step % cfg.log_every == 0 or step == total - 1:
                record = {"step": step, "stage": stage, "kl": round(kl.item(), 4),
                          "lm": None if lm is None else round(lm.item(), 4), "elapsed_s": round(time.time() - t0, 1)}
                log.write(json.dumps(record) + "\n")
                log.flush()
                bar.set_postfix(stage=stage, kl=f"{kl.item():.3f}")
    directory = out / "checkpoint"
    fp = save_checkpoint(model.eval(), directory, dtype=getattr(torch, cfg.save_dtype))
    source = Path(cfg.model) / "TRAINING.md"
    before = source.read_text() if source.exists() else ""
    (directory / "TRAINING.md").write_text(
        before + f"\n# Indexer distillation\n\n- command: `{cfg.command or 'clsa distill-indexer'}`\n"
        f"- from: {cfg.model}\n- {cfg.steps} indexer steps (backbone frozen, lr {cfg.lr}), {cfg.joint_steps} joint "
        f"steps (LM, {cfg.sparse_lm:.0%} of it through the top-{joint_topk} selection, + {cfg.kl_weight} x KL, "
        f"lr {cfg.joint_lr}); batch {cfg.batch_size} x {cfg.seq_len} tokens\n"
        f"- time {(time.time() - t0) / 60:.1f} min; fingerprint {fp}\n"
        f"- config: `{json.dumps(dataclasses.asdict(cfg))}`\n")
    return directory
