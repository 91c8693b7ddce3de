"""`clsa`: the command line. Subcommands: init, generate, serve, client, eval, train, distill-indexer,
bench, transfers."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from services.engine.config import PRESETS

# The trained, distilled clsa-small shipped in the repository (models/clsa-small/TRAINING.md).
DEFAULT_MODEL = str(Path(__file__).resolve().parents[1] / "models" / "clsa-small")
MODEL_HELP = "checkpoint directory or preset name (default: the shipped, trained models/clsa-small)"


def _cmd_init(args: argparse.Namespace) -> int:
    from services.engine.checkpoint import random_model, save_checkpoint

    model = random_model(args.preset, seed=args.seed)
    fp = save_checkpoint(model, args.out)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.preset} ({n_params / 1e6:.2f}M parameters, seed {args.seed}) to {args.out}; "
          f"fingerprint {fp}")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from services.engine import EngineConfig, LLMEngine, SamplingParams

    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        seed=args.seed, stop=tuple(args.stop), ignore_eos=args.ignore_eos,
    )
    config = EngineConfig(index_topk=args.index_topk, seed=args.seed)
    dtype = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    engine = LLMEngine.from_model(args.model, config, device=args.device, dtype=dtype)
    start = time.perf_counter()
    [out] = engine.generate([args.prompt], params, attention=args.attention)
    elapsed = time.perf_counter() - start
    if args.json:
        print(json.dumps({
            "model": args.model, "fingerprint": engine.fingerprint,
            "attention": args.attention or ("clsa" if engine.model_config.is_yoco else "dense"),
            "index_topk": engine.index_topk, "prompt_tokens": out.prompt_tokens, "token_ids": out.token_ids,
            "text": out.text, "finish_reason": out.finish_reason.value if out.finish_reason else None,
            "completion_tokens": len(out.token_ids), "elapsed_s": round(elapsed, 4),
        }))
    else:
        print(out.text)
        reason = out.finish_reason.value if out.finish_reason else "?"
        print(f"[{len(out.token_ids)} tokens, finish_reason={reason}, {elapsed:.2f}s]", file=sys.stderr)
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    import asyncio

    from services.gateway.main import ServeConfig, serve

    # a checkpoint directory as an absolute path: Ray's workers do not share this shell's directory
    model = str(Path(args.model).resolve()) if Path(args.model).is_dir() else args.model
    cfg = ServeConfig(model=model, host=args.host, port=args.port, metrics_port=args.metrics_port,
                      device=args.device, backend=args.backend, prefill_workers=args.prefill_workers,
                      decode_workers=args.decode_workers, redis_url=args.redis_url, ray_address=args.ray_address,
                      max_in_flight=args.max_in_flight, max_num_seqs=args.max_num_seqs)
    asyncio.run(serve(cfg))
    return 0


def _cmd_client(args: argparse.Namespace) -> int:
    import grpc

    from services.gateway.server import pb2, pb2_grpc

    sampling = pb2.SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                                  top_k=args.top_k, stop=args.stop, ignore_eos=args.ignore_eos)
    if args.seed is not None:
        sampling.seed = args.seed
    attention = {None: pb2.ATTENTION_MODE_UNSPECIFIED, "clsa": pb2.ATTENTION_MODE_CLSA,
                 "dense": pb2.ATTENTION_MODE_DENSE}[args.attention]
    request = pb2.GenerateRequest(text=args.prompt, sampling=sampling, attention=attention)
    with grpc.insecure_channel(args.address) as channel:
        stub = pb2_grpc.GenerationStub(channel)
        try:
            if args.stream:
                last = None
                for message in stub.Generate(request, timeout=args.timeout):
                    print(message.text, end="", flush=True)
                    last = message
                print()
            else:
                last = stub.Complete(request, timeout=args.timeout)
                print(last.text)
        except grpc.RpcError as e:
            print(f"clsa client: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    if last is not None:
        reason = pb2.FinishReason.Name(last.finish_reason)
        print(f"[{last.usage.completion_tokens} tokens, {reason}, ttft {last.timings.ttft_ms:.1f} ms]",
              file=sys.stderr)
    return 0


def _eval_text(args: argparse.Namespace, max_bytes: int) -> bytes:
    """--text as it is; else the files `clsa train` held out of --corpus (default: the stdlib)."""
    from pathlib import Path

    from services.train.data import held_out_text

    return Path(args.text).read_bytes() if args.text else held_out_text(args.corpus or None, max_bytes)


def _cmd_eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from services.engine import EngineConfig, LLMEngine
    from services.evals import passkey, ppl

    lengths = [int(x) for x in args.lengths.split(",")]
    engine = LLMEngine.from_model(args.model, EngineConfig(max_num_seqs=args.trials, attention_backend=args.backend),
                                  device=args.device)
    too_long = [n for n in lengths if n >= engine.model_config.max_seq_len]
    if too_long:
        raise ValueError(f"--lengths {too_long} reach the model's max_seq_len {engine.model_config.max_seq_len}")
    cells: list = []
    if args.name == "recall":
        from services.evals import recall

        ks = [int(x) for x in args.ks.split(",")]
        data = _eval_text(args, args.trials * max(lengths))
        cells = recall.run_recall(engine.model, data, lengths, ks, args.trials)
        print(recall.format_table(cells))
    elif args.name == "passkey":
        depths = [float(x) for x in args.depths.split(",")]
        text = None if args.filler == "classic" else _eval_text(args, 8 * max(lengths)).decode("latin-1")
        cells = passkey.run_passkey(engine, lengths, depths, args.trials, seed=args.seed, fixed_topk=args.index_topk,
                                    text=text)
        print(passkey.format_table(cells))
        print(passkey.format_depth_table(cells))
    else:
        # by default the stdlib files `clsa train` holds out, so a trained model is scored on unseen text
        data = _eval_text(args, args.trials * (max(lengths) + 1))
        cells = ppl.run_ppl(engine.model, engine.tokenizer, data, lengths, args.trials, fixed_topk=args.index_topk)
        print(ppl.format_table(cells))
    if args.out:
        Path(args.out).write_text(json.dumps({"model": args.model, "fingerprint": engine.fingerprint,
                                              "cells": [c.to_dict() for c in cells]}, indent=1))
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from services.train.trainer import TrainConfig, train

    cfg = TrainConfig(model=args.model, out=args.out, steps=args.steps, tokens_per_step=args.tokens_per_step,
                      schedule=args.schedule, lr=args.lr, warmup=args.warmup, passkey_frac=args.passkey_frac,
                      kv_frac=args.kv_frac, answer_weight=args.answer_weight, corpus=args.corpus,
                      max_corpus_bytes=args.max_corpus_mb << 20, seed=args.seed, device=args.device,
                      ckpt_every=args.ckpt_every, log_every=args.log_every, command=" ".join(sys.argv))
    limit = None if args.max_minutes is None else 60 * args.max_minutes
    print(f"checkpoint: {train(cfg, progress=not args.quiet, time_limit_s=limit)}")
    return 0


def _cmd_distill(args: argparse.Namespace) -> int:
    from services.train.distill import DistillConfig, distill

    cfg = DistillConfig(model=args.model, out=args.out, steps=args.steps, joint_steps=args.joint_steps,
                        batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr, joint_lr=args.joint_lr,
                        kl_weight=args.kl_weight, sparse_lm=args.sparse_lm, joint_topk=args.joint_topk,
                        corpus=args.corpus, max_corpus_bytes=args.max_corpus_mb << 20,
                        seed=args.seed, device=args.device, save_dtype=args.save_dtype, command=" ".join(sys.argv))
    print(f"checkpoint: {distill(cfg, progress=not args.quiet)}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from services.bench.serve import main_from_args

    return main_from_args(args)


def _cmd_transfers(args: argparse.Namespace) -> int:
    import redis

    from services.transfer import TransferLedger, TransferState

    ledger = TransferLedger.from_url(args.redis_url, prefix=args.prefix)
    states = [TransferState(s) for s in args.state] if args.state else None
    try:
        records = ledger.records(states)
    except redis.ConnectionError as e:
        raise ValueError(f"cannot reach Redis at {args.redis_url}: {e}") from None
    if args.json:
        print(json.dumps([{**r.__dict__, "state": r.state.value} for r in records]))
        return 0
    print(f"{'transfer_id':<34} {'state':<8} {'request_id':<16} {'producer':<16} {'consumer':<16} "
          f"{'tokens':>7} {'MiB':>8}  error")
    for r in records:
        print(f"{r.transfer_id:<34} {r.state.value:<8} {r.request_id[:16]:<16} {r.producer[:16]:<16} "
              f"{r.consumer[:16]:<16} {r.n_tokens:>7} {r.nbytes / 2**20:>8.2f}  {r.error}")
    counts = {s.value: sum(r.state is s for r in records) for s in TransferState}
    print(f"{len(records)} transfers: " + ", ".join(f"{k} {v}" for k, v in counts.items() if v))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clsa", description="Serve and run CLSA long-context models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("init", help="write a checkpoint of a preset with random weights")
    p.add_argument("--preset", required=True, choices=sorted(PRESETS))
    p.add_argument("--out", required=True, help="directory to write")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_init)

    p = sub.add_parser("generate", help="generate text in-process (no service)")
    p.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--attention", choices=["clsa", "dense"], default=None,
                   help="cross-layer attention (default: clsa for YOCO models)")
    p.add_argument("--index-topk", type=int, default=None, help="k of the CLSA indexer (default: the model's)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="weights and cache (auto: float32 on cpu, bfloat16 on cuda)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("serve", help="run the gRPC service (clsa.v1.Generation)")
    p.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50051)
    p.add_argument("--metrics-port", type=int, default=9090, help="Prometheus metrics over HTTP")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--backend", choices=["ray", "local"], default="ray",
                   help="ray: prefill and decode workers on Ray, transfers in Redis; local: one in-process engine")
    p.add_argument("--prefill-workers", type=int, default=1)
    p.add_argument("--decode-workers", type=int, default=1)
    p.add_argument("--redis-url", default=None, help="default: start a private redis-server")
    p.add_argument("--ray-address", default=None, help="default: start a local Ray")
    p.add_argument("--max-in-flight", type=int, default=256, help="admission limit (RESOURCE_EXHAUSTED past it)")
    p.add_argument("--max-num-seqs", type=int, default=16, help="sequences decoded together")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("client", help="call a running service")
    p.add_argument("--address", default="127.0.0.1:50051")
    p.add_argument("--prompt", required=True)
    p.add_argument("--stream", action="store_true", help="print tokens as they arrive")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[])
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--attention", choices=["clsa", "dense"], default=None)
    p.add_argument("--timeout", type=float, default=120.0, help="deadline in seconds")
    p.set_defaults(func=_cmd_client)

    p = sub.add_parser("eval", help="quality evals, DENSE vs CLSA on the same weights")
    p.add_argument("name", choices=["passkey", "ppl", "recall"])
    p.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)
    p.add_argument("--lengths", default="1024,2048,4096", help="context lengths in tokens, comma-separated")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="where the key sits, 0 = start")
    p.add_argument("--trials", type=int, default=5, help="passkey: prompts per (length, depth); ppl: windows")
    p.add_argument("--text", default=None,
                   help="ppl, recall: text file (default: the stdlib files `clsa train` holds out)")
    p.add_argument("--index-topk", type=int, default=None, help="also CLSA at this fixed k")
    p.add_argument("--ks", default="64,256,1024,2048", help="recall: top-k sizes, comma-separated")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--corpus", action="append", default=[],
                   help="ppl/recall (and passkey --filler text): the files `clsa train --corpus` held out "
                        "(default: the stdlib's)")
    p.add_argument("--filler", choices=["classic", "text"], default="classic",
                   help="passkey: the classic repeated sentences or held-out text (or --text) around the key")
    p.add_argument("--backend", choices=["auto", "triton", "torch"], default="auto",
                   help="attention kernels of the engine (auto: Triton on CUDA)")
    p.add_argument("--out", default=None, help="write the cells as JSON")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("train", help="train a YOCO model on text plus synthetic retrieval (resumable)")
    p.add_argument("--model", default="clsa-small", help="preset to initialise, or a checkpoint to continue from")
    p.add_argument("--out", required=True, help="run directory (checkpoint/, trainer_state.pt, logs); resumes")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--tokens-per-step", type=int, default=65536)
    p.add_argument("--schedule", default="2048:1.0", help="LENGTH:SHARE,... context lengths in order")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--passkey-frac", type=float, default=0.2)
    p.add_argument("--kv-frac", type=float, default=0.2)
    p.add_argument("--answer-weight", type=float, default=1.0, help="loss weight of retrieval answers' bytes")
    p.add_argument("--corpus", action="append", default=[], help="text file or directory (default: the stdlib)")
    p.add_argument("--max-corpus-mb", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--ckpt-every", type=int, default=200)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--max-minutes", type=float, default=None,
                   help="stop with a checkpoint after this long; the same command resumes")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("distill-indexer", help="distill dense attention into the CLSA indexer")
    p.add_argument("--model", required=True, help="checkpoint directory")
    p.add_argument("--out", required=True, help="run directory; the result goes to OUT/checkpoint")
    p.add_argument("--steps", type=int, default=300, help="indexer-only steps (backbone frozen)")
    p.add_argument("--joint-steps", type=int, default=0, help="then LM + kl_weight x KL steps")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--joint-lr", type=float, default=1e-4)
    p.add_argument("--kl-weight", type=float, default=0.1)
    p.add_argument("--sparse-lm", type=float, default=0.5,
                   help="joint stage: share of the LM loss taken through the indexer's top-k (CLSA) selection")
    p.add_argument("--joint-topk", type=int, default=None, help="joint stage: k of that selection (default seq-len/16)")
    p.add_argument("--corpus", action="append", default=[])
    p.add_argument("--max-corpus-mb", type=int, default=64)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--save-dtype", choices=["float32", "bfloat16"], default="float32",
                   help="bfloat16 halves the checkpoint (the shipped one)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_distill)

    p = sub.add_parser("bench", help="benchmark clients of the service")
    bench = p.add_subparsers(dest="bench", required=True)
    p = bench.add_parser("serve", help="a gRPC load generator: TTFT, TPOT, ITL, latency, throughput, goodput")
    p.add_argument("--address", default="127.0.0.1:50051")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--request-rate", type=float, default=float("inf"),
                   help="requests per second (default inf: all at once)")
    p.add_argument("--arrival", choices=["poisson", "fixed"], default="poisson",
                   help="gaps between requests: exponential (Poisson process) or all 1 / rate")
    p.add_argument("--max-concurrency", type=int, default=None, help="at most this many requests in flight")
    p.add_argument("--input-len", default="fixed:128", help="prompt tokens: fixed:N, uniform:LO,HI or file:PATH")
    p.add_argument("--output-len", default="fixed:32", help="new tokens: fixed:N, uniform:LO,HI or file:PATH")
    p.add_argument("--warmup", type=int, default=2, help="requests sent first and not measured")
    p.add_argument("--attention", choices=["clsa", "dense"], default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=300.0, help="each request's deadline in seconds")
    p.add_argument("--slo-ttft-ms", type=float, default=None, help="goodput: TTFT at most this")
    p.add_argument("--slo-tpot-ms", type=float, default=None, help="goodput: TPOT at most this")
    p.add_argument("--slo-e2e-ms", type=float, default=None, help="goodput: end-to-end latency at most this")
    p.add_argument("--json", default=None, help="write the summary and every request as JSON")
    p.add_argument("--plot", default=None, help="directory for ttft_itl.png and timeline.png")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("transfers", help="list the KV-transfer ledger in Redis")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    p.add_argument("--prefix", default="clsa:", help="key prefix of the deployment")
    p.add_argument("--state", action="append", default=[],
                   choices=["PENDING", "READY", "CLAIMED", "DONE", "FAILED", "EXPIRED"], help="only these (repeatable)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_transfers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from services.engine.errors import EngineError

    try:
        return int(args.func(args))
    except (EngineError, ValueError, ConnectionError) as e:
        print(f"clsa {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
