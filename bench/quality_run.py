"""Issue 5's GPU work: train clsa-small, evaluate, distill its indexer, evaluate again.

One device call lasts at most 10 minutes, and the whole recipe takes about 20, so `pipeline` runs
every stage in order in the background (started with setsid, it outlives the call that started it
while the machine stays held) and `collect` waits for a stage and copies what is ready to OUT:
the JSON results and logs as one `results.tar.gz`, checkpoints split in parts of at most 15 MiB (a
bf16 clsa-small checkpoint is ~37 MB; `join` puts one back together here).

    setsid python3 bench/quality_run.py pipeline WORK [--train-minutes 12] > WORK.log 2>&1 &
    python3 bench/quality_run.py collect WORK OUT --wait-for eval-trained [--parts trained]
    python3 bench/quality_run.py join PARTS_DIR DEST [--name distilled]   (here, after a call)

The stages, each also callable alone on a device call that fits it:

    python3 bench/quality_run.py train   OUT [--minutes 8]     -> OUT/trained.safetensors.part-*, config, logs
    python3 bench/quality_run.py distill OUT --model DIR
    python3 bench/quality_run.py eval    OUT --model DIR [--tag NAME]   -> OUT/{passkey,ppl,recall}-NAME.json

`train` first times 20 steps to size the run so that its cosine schedule ends inside the budget.
`--smoke` shrinks every stage to seconds on the CPU (clsa-tiny, short contexts): the plumbing test.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tarfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PART = 15 << 20
TOKENS_PER_STEP = 131072
SCHEDULE = "1024:0.2,2048:0.2,4096:0.3,8192:0.3"
LENGTHS = "1024,2048,4096,8192,16384"
STAGES = ("train", "eval-trained", "distill", "eval-distilled")
# --smoke: the same stages in seconds on a CPU (the plumbing, not the numbers)
SMOKE = {"model": "clsa-tiny", "tokens_per_step": 4096, "schedule": "512:0.5,1024:0.5", "lengths": "512,1024",
         "recall_lengths": "1024", "ks": "64,128", "ppl_lengths": "512", "distill_seq": 512}
FULL = {"model": "clsa-small", "tokens_per_step": TOKENS_PER_STEP, "schedule": SCHEDULE, "lengths": LENGTHS,
        "recall_lengths": "8192,16384", "ks": "128,256,512,1024,2048", "ppl_lengths": "1024,4096,8192",
        "distill_seq": 4096}


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


def _sizes(args: argparse.Namespace) -> dict:
    return SMOKE if getattr(args, "smoke", False) else FULL


def _device(args: argparse.Namespace) -> str:
    return "cpu" if getattr(args, "smoke", False) else "cuda"


def _tok_per_s(log: list[dict]) -> float:
    """Tokens/s over the logged steps after the first few (CUDA's warm-up excluded); each record's
    tok_per_s is cumulative, so elapsed = tokens / rate."""
    first, last = log[min(5, len(log) - 2)], log[-1]
    tokens = lambda r: (r["step"] + 1) * r["tokens"]  # noqa: E731
    elapsed = lambda r: tokens(r) / r["tok_per_s"]  # noqa: E731
    return (tokens(last) - tokens(first)) / max(elapsed(last) - elapsed(first), 1e-9)


def _corpus(args: argparse.Namespace) -> list[str]:
    out: list[str] = []
    for path in getattr(args, "corpus", None) or []:
        out += ["--corpus", path]
    if out:
        out += ["--max-corpus-mb", str(getattr(args, "corpus_mb", 64))]
    return out


def stage_train(args: argparse.Namespace) -> None:
    """Train `--start-from` (a checkpoint) or a fresh model of the preset for `minutes`, sized by
    `--tok-per-s` or by a 20-step probe."""
    out, run = Path(args.out), Path(args.work) / "train"
    sizes, device = _sizes(args), _device(args)
    schedule = getattr(args, "schedule", None) or sizes["schedule"]
    start = getattr(args, "start_from", None) or sizes["model"]
    shutil.rmtree(run, ignore_errors=True)
    t0 = time.time()
    tok_s = getattr(args, "tok_per_s", None)
    if not tok_s:
        probe = Path(args.work) / "probe"
        shutil.rmtree(probe, ignore_errors=True)
        longest = max(int(part.split(":")[0]) for part in schedule.split(","))
        clsa("train", "--model", sizes["model"], "--out", str(probe), "--steps", "20", "--tokens-per-step",
             str(sizes["tokens_per_step"]), "--schedule", f"{longest}:1", "--warmup", "5", "--log-every", "1",
             "--device", device, "--quiet")
        log = [json.loads(line) for line in (probe / "train_log.jsonl").read_text().splitlines()]
        for record in log:
            record["tokens"] = sizes["tokens_per_step"] // longest * longest
        tok_s = _tok_per_s(log)
    budget = 60 * args.minutes - (time.time() - t0) - 20
    steps = max(50, int(budget * tok_s / sizes["tokens_per_step"]))
    print(f"{tok_s:.0f} tokens/s -> {steps} steps in {budget:.0f} s", flush=True)
    clsa("train", "--model", start, "--out", str(run), "--steps", str(steps), "--tokens-per-step",
         str(sizes["tokens_per_step"]), "--schedule", schedule, "--lr", str(getattr(args, "lr", 1.5e-3)),
         "--warmup", str(min(200, steps // 10)), "--passkey-frac", str(getattr(args, "retrieval_frac", 0.3)),
         "--kv-frac", str(getattr(args, "retrieval_frac", 0.3)), "--answer-weight", "2", "--ckpt-every", "100000",
         "--log-every", "20", "--max-minutes", str(budget / 60 + 0.5), "--device", device, "--quiet",
         *_corpus(args))
    to_bf16(run / "checkpoint", Path(args.work) / "trained")
    split_checkpoint(Path(args.work) / "trained", out, "trained")
    shutil.copy(run / "train_log.jsonl", out / "train_log.jsonl")


def stage_distill(args: argparse.Namespace) -> None:
    out, run = Path(args.out), Path(args.work) / "distill"
    shutil.rmtree(run, ignore_errors=True)
    clsa("distill-indexer", "--model", args.model, "--out", str(run), "--steps", str(args.steps),
         "--joint-steps", str(args.joint_steps), "--batch-size", "4", "--seq-len", str(_sizes(args)["distill_seq"]),
         "--joint-lr", str(getattr(args, "joint_lr", 1e-4)), "--device", _device(args), "--save-dtype", "bfloat16",
         "--quiet", *_corpus(args))
    shutil.rmtree(Path(args.work) / "distilled", ignore_errors=True)
    shutil.copytree(run / "checkpoint", Path(args.work) / "distilled")
    split_checkpoint(run / "checkpoint", out, "distilled")
    shutil.copy(run / "distill_log.jsonl", out / "distill_log.jsonl")


def stage_eval(args: argparse.Namespace) -> None:
    """recall, ppl (on the files training held out) and passkey; `lite`: recall and a smaller
    passkey grid only (the "before distillation" tables, when device time is short)."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag, sizes, device, lite = args.tag, _sizes(args), _device(args), getattr(args, "lite", False)
    text = [flag for path in getattr(args, "corpus", None) or [] for flag in ("--corpus", path)]
    clsa("eval", "recall", "--model", args.model, "--lengths", sizes["recall_lengths"], "--ks", sizes["ks"],
         "--trials", "2", "--device", device, "--out", str(out / f"recall-{tag}.json"), *text)
    if not lite:
        clsa("eval", "ppl", "--model", args.model, "--lengths", sizes["ppl_lengths"], "--trials", "4",
             "--index-topk", "512", "--device", device, "--out", str(out / f"ppl-{tag}.json"), *text)
    lengths = ",".join(sizes["lengths"].split(",")[::2]) if lite else sizes["lengths"]
    passkey = ["eval", "passkey", "--model", args.model, "--lengths", lengths, "--depths",
               "0,0.5,1" if lite else "0,0.25,0.5,0.75,1", "--trials", str(args.trials), "--index-topk", "512",
               "--device", device, "--out", str(out / f"passkey-{tag}.json")]
    try:
        clsa(*passkey)
    except subprocess.CalledProcessError:  # the numbers matter more than the kernels here
        print("passkey with the Triton kernels failed; again with the torch reference", flush=True)
        clsa(*passkey, "--backend", "torch")


def stage_pipeline(args: argparse.Namespace) -> None:
    """Every stage in order; WORK/status.json says which are done or failed. A failed stage is
    recorded and the ones that do not need its output still run."""
    work = Path(args.work)
    results = work / "results"
    results.mkdir(parents=True, exist_ok=True)
    status: dict = {"done": [], "failed": {}, "running": None, "started": time.time()}
    common = {"smoke": args.smoke, "corpus": args.corpus, "corpus_mb": args.corpus_mb}

    def save() -> None:
        (work / "status.json.tmp").write_text(json.dumps(status))
        (work / "status.json.tmp").replace(work / "status.json")

    def run(stage: str, **kw: object) -> None:
        status["running"] = stage
        save()
        t0 = time.time()
        try:
            {"train": stage_train, "distill": stage_distill, "eval": stage_eval}[stage.split("-")[0]](
                argparse.Namespace(out=str(results), work=str(work), **common, **kw))
            status["done"].append(stage)
        except Exception:  # noqa: BLE001 - recorded; the stages that can still run do
            status["failed"][stage] = traceback.format_exc()[-2000:]
            print(status["failed"][stage], flush=True)
        status.setdefault("seconds", {})[stage] = round(time.time() - t0, 1)
        status["running"] = None
        save()

    save()
    run("train", minutes=args.train_minutes, start_from=args.start_from, tok_per_s=args.tok_per_s,
        schedule=args.schedule, lr=args.lr, retrieval_frac=args.retrieval_frac)
    if "train" in status["done"]:
        run("eval-trained", model=str(work / "trained"), tag="trained", trials=args.trials_before,
            lite=args.lite_before)
        run("distill", model=str(work / "trained"), steps=args.distill_steps, joint_steps=args.joint_steps,
            joint_lr=args.joint_lr)
    if "distill" in status["done"]:
        run("eval-distilled", model=str(work / "distilled"), tag="distilled", trials=args.trials_after)
    status["finished"] = True
    save()


def stage_collect(args: argparse.Namespace) -> None:
    """Wait (at most --timeout s) until --wait-for is done, failed or the pipeline finished, then copy
    results.tar.gz (every JSON, log and the status) and the parts of the checkpoints asked for to OUT."""
    work, out = Path(args.work), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.time() + args.timeout
    status: dict = {}
    while time.time() < deadline:
        path = work / "status.json"
        status = json.loads(path.read_text()) if path.exists() else {}
        if status.get("finished") or args.wait_for in status.get("done", []) or args.wait_for in status.get(
                "failed", {}):
            break
        time.sleep(5)
    print(f"collect: done {status.get('done')}, failed {list(status.get('failed', {}))}, running "
          f"{status.get('running')}, seconds {status.get('seconds')}", flush=True)
    results = work / "results"
    with tarfile.open(out / "results.tar.gz", "w:gz") as tar:
        for path in sorted(results.glob("*")):
            if path.is_file() and ".safetensors.part-" not in path.name:
                tar.add(path, arcname=path.name)
        for name in ("status.json", "pipeline.log"):
            if (work / name).exists():
                tar.add(work / name, arcname=name)
    for name in args.parts:
        for part in sorted(results.glob(f"{name}.safetensors.part-*")):
            shutil.copy(part, out / part.name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="stage", required=True)
    p = sub.add_parser("pipeline")
    p.add_argument("work")
    p.add_argument("--train-minutes", type=float, default=12.0)
    p.add_argument("--distill-steps", type=int, default=800)
    p.add_argument("--trials-before", type=int, default=4)
    p.add_argument("--trials-after", type=int, default=8)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--start-from", default=None, help="continue training this checkpoint (default: a fresh preset)")
    p.add_argument("--corpus", action="append", default=[], help="training text (default: the stdlib)")
    p.add_argument("--corpus-mb", type=int, default=64)
    p.add_argument("--tok-per-s", type=float, default=None, help="known training throughput: no probe")
    p.add_argument("--schedule", default=None, help=f"context schedule (default {SCHEDULE})")
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--retrieval-frac", type=float, default=0.3, help="share of pass-key and of key-value samples")
    p.add_argument("--joint-steps", type=int, default=0, help="distill: LM (dense + CLSA) + KL steps")
    p.add_argument("--joint-lr", type=float, default=1e-4)
    p.add_argument("--lite-before", action="store_true", help="eval-trained: recall and a small passkey grid")
    p = sub.add_parser("collect")
    p.add_argument("work")
    p.add_argument("out")
    p.add_argument("--wait-for", choices=STAGES, default="eval-distilled")
    p.add_argument("--timeout", type=float, default=540.0)
    p.add_argument("--parts", nargs="*", default=[], choices=["trained", "distilled"])
    p = sub.add_parser("train")
    p.add_argument("out")
    p.add_argument("--minutes", type=float, default=8.0)
    p.add_argument("--work", default="/tmp/clsa-quality")
    p.add_argument("--smoke", action="store_true")
    p = sub.add_parser("distill")
    p.add_argument("out")
    p.add_argument("--model", required=True)
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--joint-steps", type=int, default=0)
    p.add_argument("--work", default="/tmp/clsa-quality")
    p.add_argument("--smoke", action="store_true")
    p = sub.add_parser("eval")
    p.add_argument("out")
    p.add_argument("--model", required=True)
    p.add_argument("--tag", default="model")
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--smoke", action="store_true")
    p = sub.add_parser("join")
    p.add_argument("parts_dir")
    p.add_argument("dest")
    p.add_argument("--name", default="trained")
    args = parser.parse_args()
    if args.stage == "join":
        join_checkpoint(Path(args.parts_dir), args.name, Path(args.dest))
        return
    {"train": stage_train, "distill": stage_distill, "eval": stage_eval, "pipeline": stage_pipeline,
     "collect": stage_collect}[args.stage](args)


if __name__ == "__main__":
    main()
