"""Throughput on one GPU at long context: CLSA against a Transformer, dense YOCO and two CLSA baselines.

Two measurements per variant (the variants of bench/decode.py, same engine, random bf16 weights
of the DESIGN.md presets, projections stacked and layers compiled):

  steady state   the decode step at the largest batch the variant fits in GPU memory with N-token
                 contexts (bench/decode.py's synthetic batch through the engine's CUDA graphs):
                 tokens/s = B / step time. This is where the Transformer's KV per sequence
                 (16 GiB at 128K) limits it to a handful of sequences.
  end to end     R requests of N random prompt tokens that each generate --new-tokens tokens
                 (greedy, no EOS), through `LLMEngine`: one prompt per prefill step
                 (`max_prefill_tokens = prefill_chunk = N`), then decode of the whole batch through
                 the CUDA graphs, the KV pool sized for the R sequences. Wall time from submission
                 to the last token; generated tokens/s, the share of prefill (until the last
                 prompt's first token), the median time to first token, and the decode step time
                 once the whole batch decodes. R runs over --requests ("tfit": the Transformer's
                 largest batch at N; a number: where the variant fits that many).

Before each end-to-end run the same engine serves one N-token and R - 1 short requests
(compilation for both shapes and the graph of bucket R out of the way).

GPU: python bench/throughput.py --out DIR   (DIR/throughput.json, DIR/throughput.txt)
CPU smoke run (clsa-tiny shapes, times meaningless): python bench/throughput.py --smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import decode as bench_decode  # noqa: E402
from decode import BLOCK, MAX_FIT, VARIANTS, Variant, fits, log, parse_n, per_sequence_bytes, random_model  # noqa: E402

from services.engine.config import ModelConfig, preset  # noqa: E402
from services.engine.engine import AttentionName, EngineConfig, LLMEngine  # noqa: E402
from services.engine.model import CLSAModel  # noqa: E402
from services.engine.sampling import SamplingParams  # noqa: E402
from services.engine.tokenizer import ByteTokenizer  # noqa: E402

WARMUP_PROMPT = 64


def sync() -> None:
    if bench_decode.DEVICE.type == "cuda":
        torch.cuda.synchronize()


def end_to_end(variant: Variant, model: CLSAModel, n: int, requests: int, new_tokens: int) -> dict:
    """`requests` prompts of `n` tokens, `new_tokens` each, through one LLMEngine."""
    cfg = model.cfg
    engine = LLMEngine(model, ByteTokenizer(), EngineConfig(
        block_size=BLOCK, kv_cache_bytes=requests * per_sequence_bytes(cfg, n + new_tokens), max_num_seqs=requests,
        prefill_chunk=n, max_prefill_tokens=n, cross_attention=variant.policy, cuda_graphs=True))
    mode: AttentionName = "clsa" if variant.sparse else "dense"
    gen = torch.Generator().manual_seed(n)
    try:
        # One full-length prompt (a prefill of n tokens compiled) and short ones up to R (the graph
        # of bucket R captured).
        warm = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
        engine.generate([torch.randint(0, cfg.vocab_size, (n if i == 0 else WARMUP_PROMPT,), generator=gen).tolist()
                         for i in range(requests)], warm, mode)
        params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
        prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=gen).tolist() for _ in range(requests)]
        sync()
        start = time.perf_counter()
        ids = [engine.add_request(p, params, mode) for p in prompts]
        first: dict[str, float] = {}
        done: dict[str, float] = {}
        while engine.has_unfinished_requests():
            outs = engine.step()
            now = time.perf_counter() - start
            for out in outs:
                first.setdefault(out.request_id, now)
                if out.finished:
                    done[out.request_id] = now
                    assert len(out.token_ids) == new_tokens, f"{out.request_id}: {len(out.token_ids)} tokens"
        wall = time.perf_counter() - start
    finally:
        del engine
        if bench_decode.DEVICE.type == "cuda":
            torch.cuda.empty_cache()
    prefill_s = max(first.values())  # the last prompt's first token: every prefill is done
    # Decode starts once every prompt is in (a prefill step admits one): the whole batch then steps.
    step_ms = (wall - prefill_s) / (new_tokens - 1) * 1e3 if new_tokens > 1 else 0.0
    return {"variant": variant.name, "n": n, "requests": requests, "new_tokens": new_tokens, "wall_s": wall,
            "tok_s": requests * new_tokens / wall, "prefill_s": prefill_s, "decode_s": wall - prefill_s,
            "ttft_median_s": statistics.median(first.values()), "decode_step_ms": step_ms,
            "last_token_s": max(done[i] for i in ids)}


def steady_state(variant: Variant, model: CLSAModel, n: int, reps: int) -> dict:
    fit = fits(model.cfg, n)
    if fit < 1:
        return {"variant": variant.name, "n": n, "b": 0, "error": "does not fit one sequence"}
    [row] = bench_decode.run_variant(variant, model, n, [fit], reps, breakdown=False)
    return row


def print_tables(steady: list[dict], e2e: list[dict], report: list[str]) -> None:
    def line(text: str = "") -> None:
        print(text, flush=True)
        report.append(text)

    line("== steady-state decode at each variant's largest batch (CUDA graph of the step)")
    line(f"{'N':>7} {'variant':>15} {'B':>4} {'step_ms':>9} {'tok/s':>9} {'vs transformer':>15}")
    for n in sorted({r["n"] for r in steady}):
        t = next((r for r in steady if r["n"] == n and r["variant"] == "transformer" and "tok_s" in r), None)
        for r in (r for r in steady if r["n"] == n):
            if "tok_s" not in r:
                line(f"{n:>7} {r['variant']:>15}  {r.get('error', '-')}")
                continue
            ratio = f"{r['tok_s'] / t['tok_s']:.1f}x" if t else "-"
            line(f"{n:>7} {r['variant']:>15} {r['b']:>4} {r['step_ms']:>9.3f} {r['tok_s']:>9.0f} {ratio:>15}")
    line()
    line("== end to end: R prompts of N tokens, each then generating T tokens, through LLMEngine")
    line(f"{'N':>7} {'R':>4} {'T':>4} {'variant':>15} {'wall_s':>8} {'gen tok/s':>10} {'prefill_s':>10} "
         f"{'decode_s':>9} {'TTFT_s':>7} {'step_ms':>8} {'vs transformer':>15}")
    by = {(r["variant"], r["n"], r["requests"]): r for r in e2e}
    for r in sorted(e2e, key=lambda r: (r["n"], r["requests"], list(VARIANTS).index(r["variant"]))):
        t = by.get(("transformer", r["n"], r["requests"]))
        ratio = f"{r['tok_s'] / t['tok_s']:.1f}x" if t else "-"
        line(f"{r['n']:>7} {r['requests']:>4} {r['new_tokens']:>4} {r['variant']:>15} {r['wall_s']:>8.2f} "
             f"{r['tok_s']:>10.1f} {r['prefill_s']:>10.2f} {r['decode_s']:>9.2f} {r['ttft_median_s']:>7.2f} "
             f"{r['decode_step_ms']:>8.2f} {ratio:>15}")


def write_json(out: Path, device_name: str, steady: list[dict], e2e: list[dict], oom: list[dict],
               partial: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "throughput.json").write_text(json.dumps({"device": device_name, "torch": torch.__version__,
                                                     "partial": partial, "steady": steady, "e2e": e2e,
                                                     "e2e_out_of_memory": oom}, indent=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", default="128K", help="context / prompt length")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--requests", nargs="+", default=["tfit", "32"],
                   help="end-to-end request counts: 'tfit' (the Transformer's largest batch) or numbers")
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--no-steady", action="store_true", help="only the end-to-end runs")
    p.add_argument("--out", default="/tmp/throughput")
    p.add_argument("--smoke", action="store_true", help="on the CPU, clsa-tiny shapes, N=300, 8 new tokens")
    args = p.parse_args()
    n = parse_n(args.n)
    if args.smoke:
        bench_decode.DEVICE = torch.device("cpu")
        n, args.new_tokens, args.reps = 300, 8, 2
    device_name = torch.cuda.get_device_name() if bench_decode.DEVICE.type == "cuda" else "cpu"
    steady: list[dict] = []
    e2e: list[dict] = []
    oom: list[dict] = []  # end-to-end runs that did not fit, listed after the table
    tfit = None
    for preset_name in ("transformer-4b", "clsa-4b"):
        names = [v for v in args.variants if VARIANTS[v].preset == preset_name]
        if not names:
            continue
        cfg: ModelConfig = preset(preset_name)
        if args.smoke:
            cfg = dataclasses.replace(preset("clsa-tiny"), arch=cfg.arch, index_topk=32)
        model = random_model(cfg)
        model.fuse_projections()
        if bench_decode.DEVICE.type == "cuda":
            model.compile_layers()
        fit = fits(cfg, n + args.new_tokens)
        if tfit is None:  # the Transformer's (about as many weights as clsa-4b, so measurable here)
            tcfg = dataclasses.replace(cfg, arch="transformer")
            tfit = fits(tcfg, n + args.new_tokens)
        log(f"{preset_name}: {fit} sequences of {n + args.new_tokens} tokens fit")
        with torch.inference_mode():
            for name in names:
                variant = VARIANTS[name]
                if not args.no_steady:
                    steady.append(steady_state(variant, model, n, args.reps))
                    log(f"steady {name}: {steady[-1]}")
                counts = sorted({min(tfit if spec == "tfit" else int(spec), 3 if args.smoke else MAX_FIT)
                                 for spec in args.requests})
                for r in counts:
                    if not 1 <= r <= fit:
                        log(f"e2e {name}: {r} requests do not fit ({fit} do); skipped")
                        continue
                    try:
                        e2e.append(end_to_end(variant, model, n, r, args.new_tokens))
                        log(f"e2e {name}: {e2e[-1]}")
                    except torch.OutOfMemoryError as exc:  # reported; the next run still goes
                        log(f"e2e {name} R={r}: out of memory ({str(exc)[:80]})")
                        oom.append({"variant": name, "n": n, "requests": r, "error": "out of memory"})
                write_json(Path(args.out), device_name, steady, e2e, oom, partial=True)  # kept if a later one dies
        del model
        if bench_decode.DEVICE.type == "cuda":
            torch.cuda.empty_cache()
    report: list[str] = [f"device: {device_name}"]
    print_tables(steady, e2e, report)
    for r in oom:
        report.append(f"  {r['variant']} R={r['requests']}: out of memory")
        print(report[-1])
    out = Path(args.out)
    write_json(out, device_name, steady, e2e, oom, partial=False)
    (out / "throughput.txt").write_text("\n".join(report) + "\n")


if __name__ == "__main__":
    main()
