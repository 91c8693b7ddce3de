"""`clsa train`: train a YOCO model on text plus synthetic retrieval, with checkpoints and resume.

AdamW, linear warm-up then cosine decay, gradient clipping, bf16 autocast on CUDA (fp32 on CPU).
A schedule of context lengths ("1024:0.5,8192:0.5": half the steps at 1K, then half at 8K) with a
fixed number of tokens per step. Every `ckpt_every` steps the weights go to `OUT/checkpoint` (a
normal clsa checkpoint) and the optimizer, step and config to `OUT/trainer_state.pt`; a run started
again on the same OUT resumes from there. Batches are a pure function of (seed, step), so a resumed
run trains on exactly the batches it would have seen. `OUT/train_log.jsonl` has one line per
logged step; `OUT/checkpoint/TRAINING.md` records how the weights were made.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from services.engine.checkpoint import load_checkpoint, save_checkpoint
from services.engine.config import preset
from services.engine.model import CLSAModel
from services.train.data import Mixer, batch_rng, training_text
from services.train.progress import progress_bar

STATE = "trainer_state.pt"
CHECKPOINT = "checkpoint"
LOG = "train_log.jsonl"


@dataclass
class TrainConfig:
    model: str = "clsa-small"  # a preset (random init) or a checkpoint directory to start from
    out: str = "runs/clsa-small"
    steps: int = 1000
    tokens_per_step: int = 65536
    schedule: str = "2048:1.0"  # context length : share of the steps, in order
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    passkey_frac: float = 0.2
    kv_frac: float = 0.2
    answer_weight: float = 1.0
    corpus: list[str] = field(default_factory=list)  # files or directories; empty: the stdlib
    max_corpus_bytes: int = 64 << 20
    seed: int = 0
    device: str = "auto"
    ckpt_every: int = 200
    log_every: int = 10
    command: str = ""  # the command line, recorded beside the checkpoint

    def __post_init__(self) -> None:
        for name in ("steps", "tokens_per_step", "warmup", "ckpt_every", "log_every", "max_corpus_bytes"):
            if getattr(self, name) < (0 if name == "warmup" else 1):
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"lr must be > 0 and min_lr_ratio in [0, 1], got {self.lr}, {self.min_lr_ratio}")
        self.stages()  # validates the schedule

    def stages(self) -> list[tuple[int, int]]:
        """[(context length, last step of that stage + 1)] from the schedule."""
        parts: list[tuple[int, float]] = []
        try:
            for item in self.schedule.split(","):
                n, w = item.split(":")
                parts.append((int(n), float(w)))
        except ValueError:
            raise ValueError(f"schedule {self.schedule!r}: expected LENGTH:SHARE[,LENGTH:SHARE...]") from None
        total = sum(share for _, share in parts)
        if total <= 0 or any(n < 2 or s < 0 for n, s in parts):
            raise ValueError(f"schedule {self.schedule!r}: lengths >= 2 and shares >= 0 with a positive sum")
        out: list[tuple[int, int]] = []
        acc = 0.0
        for length, share in parts:
            acc += share
            out.append((length, round(self.steps * acc / total)))
        return out

    def seq_len_at(self, step: int) -> int:
        for length, end in self.stages():
            if step < end:
                return length
        return self.stages()[-1][0]

    def lr_at(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.steps - self.warmup)
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * cosine)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device here")
    return torch.device(name)


def weighted_lm_loss(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy, each target weighted (answers of retrieval samples)."""
    nll = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
    w = weights.flatten()
    return (nll * w).sum() / w.sum()


def make_batch(mixers: dict[int, Mixer], cfg: TrainConfig, step: int, device: torch.device
               ) -> tuple[torch.Tensor, torch.Tensor]:
    seq_len = cfg.seq_len_at(step)
    rows = max(1, cfg.tokens_per_step // seq_len)
    samples = [mixers[seq_len].sample(batch_rng(cfg.seed, step, i)) for i in range(rows)]
    tokens = torch.tensor([s.tokens for s in samples], dtype=torch.long, device=device)
    weights = torch.tensor([s.weights for s in samples], dtype=torch.float32, device=device)
    return tokens, weights


def _optimizer(model: CLSAModel, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() >= 2]
    other = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": other, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))


def _fresh_model(spec: str, seed: int) -> CLSAModel:
    if Path(spec).is_dir():
        return load_checkpoint(spec).train()
    model = CLSAModel(preset(spec))
    model.init_weights(seed)
    return model.train()


def train(cfg: TrainConfig, progress: bool = True, stop_at: int | None = None,
          time_limit_s: float | None = None) -> Path:
    """Train (or resume) into cfg.out; returns the checkpoint directory. Stops early - with a
    checkpoint, to be resumed by the same call - at step `stop_at` or once `time_limit_s` seconds
    have passed (a device call's budget)."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    device = pick_device(cfg.device)
    state_path = out / STATE
    start, base_seconds = 0, 0.0
    if state_path.exists():
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        saved = state["config"]
        for name in ("model", "tokens_per_step", "schedule", "seed"):
            if saved[name] != getattr(cfg, name):
                raise ValueError(f"{out} holds a run with {name}={saved[name]!r}, not {getattr(cfg, name)!r}: "
                                 "use another --out to start over")
        model = load_checkpoint(out / CHECKPOINT).train().to(device)
        optimizer = _optimizer(model, cfg)
        optimizer.load_state_dict(state["optimizer"])
        start, base_seconds = state["step"], state.get("seconds", 0.0)
    else:
        model = _fresh_model(cfg.model, cfg.seed).to(device)
        optimizer = _optimizer(model, cfg)
    if not model.cfg.is_yoco:
        raise ValueError("clsa train trains YOCO models (the transformer preset is a benchmark baseline)")
    if max(n for n, _ in cfg.stages()) > model.cfg.max_seq_len:
        raise ValueError(f"schedule reaches {max(n for n, _ in cfg.stages())} tokens, past the model's "
                         f"max_seq_len {model.cfg.max_seq_len}")
    text = training_text(cfg.corpus or None, cfg.max_corpus_bytes)
    mixers = {n: Mixer(text, n, cfg.passkey_frac, cfg.kv_frac, cfg.answer_weight) for n, _ in cfg.stages()}
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast(
        "cpu", enabled=False)
    t0 = time.time()
    tokens_seen = 0
    bar = progress_bar(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not progress, desc="train",
               unit="step", dynamic_ncols=True)
    with (out / LOG).open("a") as log:
        for step in bar:
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr_at(step)
            tokens, weights = make_batch(mixers, cfg, step, device)
            with autocast:
                logits = model.forward_train(tokens[:, :-1])
            loss = weighted_lm_loss(logits, tokens[:, 1:], weights)  # type: ignore[arg-type]
            if not torch.isfinite(loss):
                raise FloatingPointError(f"step {step}: loss is {loss.item()}; lower --lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            tokens_seen += tokens[:, 1:].numel()
            if step % cfg.log_every == 0 or step == cfg.steps - 1:
                elapsed = time.time() - t0
                record = {"step": step, "loss": round(loss.item(), 4), "lr": cfg.lr_at(step),
                          "seq_len": tokens.shape[1] - 1, "tok_per_s": round(tokens_seen / max(elapsed, 1e-9))}
                log.write(json.dumps(record) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{loss.item():.3f}", len=tokens.shape[1] - 1, tok_s=record["tok_per_s"])
            stopping = (stop_at is not None and step + 1 >= stop_at) or (
                time_limit_s is not None and time.time() - t0 >= time_limit_s)
            if (step + 1) % cfg.ckpt_every == 0 or step == cfg.steps - 1 or stopping:
                _save(model, optimizer, cfg, step + 1, out, device, base_seconds + time.time() - t0)
            if stopping:
                break
    return out / CHECKPOINT


def _save(model: CLSAModel, optimizer: torch.optim.Optimizer, cfg: TrainConfig, step: int, out: Path,
          device: torch.device, seconds: float) -> None:
    """Checkpoint first, then the state that points at it: a crash in between resumes one interval back."""
    fp = save_checkpoint(model, out / CHECKPOINT)
    tmp = out / (STATE + ".tmp")
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "config": dataclasses.asdict(cfg),
                "seconds": seconds, "fingerprint": fp}, tmp)
    tmp.replace(out / STATE)
    (out / CHECKPOINT / "TRAINING.md").write_text(_record(cfg, step, device, seconds, fp))


def _record(cfg: TrainConfig, step: int, device: torch.device, seconds: float, fp: str) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    corpus = ", ".join(cfg.corpus) if cfg.corpus else "Python standard library sources (every 20th file held out)"
    return (f"# How these weights were made\n\n"
            f"- command: `{cfg.command or 'clsa train'}`\n"
            f"- started from: {cfg.model}\n- data: {corpus}; pass-key samples {cfg.passkey_frac:.0%}, "
            f"key-value samples {cfg.kv_frac:.0%} (answer weight {cfg.answer_weight})\n"
            f"- steps: {step} of {cfg.steps}, {cfg.tokens_per_step} tokens per step, context schedule "
            f"{cfg.schedule}\n- optimizer: AdamW lr {cfg.lr} (warm-up {cfg.warmup}, cosine to "
            f"{cfg.min_lr_ratio:.0%}), weight decay {cfg.weight_decay}, clip {cfg.grad_clip}\n"
            f"- device: {name}; training time so far {seconds / 60:.1f} min\n- fingerprint: {fp}\n")
