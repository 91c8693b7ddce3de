"""Issue 5's GPU work in device-call-sized stages: train clsa-small, distill its indexer, evaluate.

Each stage fits one device call (10 minutes) and writes what must come back under OUT, in files of
at most 15 MiB (a bf16 clsa-small checkpoint is ~37 MB: it travels split, `join` puts it back).

    python3 bench/quality_run.py train   OUT [--minutes 8]     -> OUT/trained.safetensors.part-*, config, logs
    python3 bench/quality_run.py distill OUT --model DIR [--minutes 3]
    python3 bench/quality_run.py eval    OUT --model DIR [--tag NAME]   -> OUT/{passkey,ppl,recall}-NAME.json
    python3 bench/quality_run.py join    PARTS_DIR DEST    (here, after a call: reassemble a checkpoint)

`train` first times 20 steps to size the run so that its cosine schedule ends inside the budget.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PART = 15 << 20
TOKENS_PER_STEP = 131072
SCHEDULE = "1024:0.3,4096:0.4,8192:0.3"
LENGTHS = "1024,2048,4096,8192,16384"


def clsa(*args: str) -> None:
    cmd = [sys.executable, "-m", "services.cli", *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def split_checkpoint(src: Path, out: Path, name: str) -> None:
    """config.json and TRAINING.md as they are; the weights in parts of at most 15 MiB."""
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "config.json", out / f"{name}.config.json")
    if (src / "TRAINING.md").exists():
        shutil.copy(src / "TRAINING.md", out / f"{name}.TRAINING.md")
    data = (src / "model.safetensors").read_bytes()
    for i in range(0, len(data), PART):
        (out / f"{name}.safetensors.part-{i // PART}").write_bytes(data[i:i + PART])


def join_checkpoint(parts_dir: Path, name: str, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    parts = sorted(parts_dir.glob(f"{name}.safetensors.part-*"), key=lambda p: int(p.name.rsplit("-", 1)[1]))
    if not parts:
        raise SystemExit(f"no {name}.safetensors.part-* under {parts_dir}")
    (dest / "model.safetensors").write_bytes(b"".join(p.read_bytes() for p in parts))
    shutil.copy(parts_dir / f"{name}.config.json", dest / "config.json")
    if (parts_dir / f"{name}.TRAINING.md").exists():
        shutil.copy(parts_dir / f"{name}.TRAINING.md", dest / "TRAINING.md")
    from services.engine.checkpoint import load_checkpoint

    print(f"{dest}: fingerprint {load_checkpoint(dest).fingerprint}")


def to_bf16(src: Path, dest: Path) -> None:
    import torch

    from services.engine.checkpoint import load_checkpoint, save_checkpoint

    save_checkpoint(load_checkpoint(src), dest, dtype=torch.bfloat16)
    if (src / "TRAINING.md").exists():
        shutil.copy(src / "TRAINING.md", dest / "TRAINING.md")


def stage_train(args: argparse.Namespace) -> None:
    out, run = Path(args.out), Path("/tmp/clsa-train")
    shutil.rmtree(run, ignore_errors=True)
    probe = Path("/tmp/clsa-probe")
    shutil.rmtree(probe, ignore_errors=True)
    t0 = time.time()
    clsa("train", "--model", "clsa-small", "--out", str(probe), "--steps", "20", "--tokens-per-step",
         str(TOKENS_PER_STEP), "--schedule", "8192:1", "--warmup", "5", "--log-every", "1", "--device", "cuda",
         "--quiet")
    log = [json.loads(line) for line in (probe / "train_log.jsonl").read_text().splitlines()]
    tok_s = log[-1]["tok_per_s"]
    budget = 60 * args.minutes - (time.time() - t0) - 30
    steps = max(50, int(budget * tok_s / TOKENS_PER_STEP))
    print(f"probe: {tok_s} tokens/s at 8K -> {steps} steps in {budget:.0f} s", flush=True)
    clsa("train", "--model", "clsa-small", "--out", str(run), "--steps", str(steps), "--tokens-per-step",
         str(TOKENS_PER_STEP), "--schedule", SCHEDULE, "--lr", "1.5e-3", "--warmup", str(min(200, steps // 10)),
         "--passkey-frac", "0.25", "--kv-frac", "0.25", "--answer-weight", "2", "--ckpt-every", "100000",
         "--max-minutes", str(budget / 60 + 0.5), "--device", "cuda", "--quiet")
    to_bf16(run / "checkpoint", Path("/tmp/trained"))
    split_checkpoint(Path("/tmp/trained"), out, "trained")
    shutil.copy(run / "train_log.jsonl", out / "train_log.jsonl")


def stage_distill(args: argparse.Namespace) -> None:
    out, run = Path(args.out), Path("/tmp/clsa-distill")
    shutil.rmtree(run, ignore_errors=True)
    clsa("distill-indexer", "--model", args.model, "--out", str(run), "--steps", str(args.steps),
         "--joint-steps", str(args.joint_steps), "--batch-size", "4", "--seq-len", "4096", "--device", "cuda",
         "--save-dtype", "bfloat16", "--quiet")
    split_checkpoint(run / "checkpoint", out, "distilled")
    shutil.copy(run / "distill_log.jsonl", out / "distill_log.jsonl")


def stage_eval(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = args.tag
    clsa("eval", "recall", "--model", args.model, "--lengths", "8192,16384", "--ks", "128,256,512,1024,2048",
         "--trials", "2", "--device", "cuda", "--out", str(out / f"recall-{tag}.json"))
    clsa("eval", "ppl", "--model", args.model, "--lengths", "1024,4096,8192", "--trials", "4", "--index-topk", "512",
         "--device", "cuda", "--out", str(out / f"ppl-{tag}.json"))
    clsa("eval", "passkey", "--model", args.model, "--lengths", LENGTHS, "--depths", "0,0.25,0.5,0.75,1",
         "--trials", str(args.trials), "--index-topk", "512", "--device", "cuda",
         "--out", str(out / f"passkey-{tag}.json"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="stage", required=True)
    p = sub.add_parser("train")
    p.add_argument("out")
    p.add_argument("--minutes", type=float, default=8.0)
    p = sub.add_parser("distill")
    p.add_argument("out")
    p.add_argument("--model", required=True)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--joint-steps", type=int, default=0)
    p = sub.add_parser("eval")
    p.add_argument("out")
    p.add_argument("--model", required=True)
    p.add_argument("--tag", default="model")
    p.add_argument("--trials", type=int, default=8)
    p = sub.add_parser("join")
    p.add_argument("parts_dir")
    p.add_argument("dest")
    p.add_argument("--name", default="trained")
    args = parser.parse_args()
    if args.stage == "join":
        join_checkpoint(Path(args.parts_dir), args.name, Path(args.dest))
        return
    {"train": stage_train, "distill": stage_distill, "eval": stage_eval}[args.stage](args)


if __name__ == "__main__":
    main()
