"""Prefill on one GPU: CLSA (YOCO) against the Transformer, through the engine's prefill.

One prompt of N random tokens, prefilled by `ModelRunner.prefill` in one chunk (or in chunks of
--chunk tokens, as a server prefills), each model on its fastest path: the Transformer's 32 layers
through SDPA's flash causal kernel; YOCO's 16 sliding-window layers through our window kernel
(`kernels.window_attention`) on a GPU, the shared K/V and indexer keys for every token, the cross
layers for the last token only - YOCO's early exit. Random bf16 weights of the DESIGN.md presets
with stacked projections (--compile: the layers compiled, as the results in docs/performance.md).
Reports the median time of 3 prefills after a warm-up (each run kept in the JSON), tokens/s and
the ratio to the Transformer, for N in --ns.

GPU: python bench/prefill.py --compile --out DIR   (DIR/prefill.json, DIR/prefill.txt; --chunk C: chunked)
CPU smoke run (clsa-tiny shapes, times meaningless): python bench/prefill.py --smoke
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
import decode_ab  # noqa: E402
from decode import BLOCK, log, parse_n, random_model  # noqa: E402

import services.engine.layers as layers  # noqa: E402
from services.engine.cache import KVCache  # noqa: E402
from services.engine.config import preset  # noqa: E402
from services.engine.runner import ModelRunner  # noqa: E402
from services.engine.sampling import SamplingParams  # noqa: E402
from services.engine.sequence import Sequence  # noqa: E402

VARIANTS = {"transformer": ("transformer-4b", False), "clsa": ("clsa-4b", True), "dense-yoco": ("clsa-4b", False)}


def prefill_times(model, n: int, sparse: bool, reps: int, profile: bool = False,  # noqa: ANN001
                  chunk: int | None = None, settings: list | None = None) -> list[list[float]]:
    """The times (ms) of `reps` prefills after a warm-up, one list per setting (`settings`: those of
    bench/decode_ab.py, [(name, switches)]; None: as the modules stand): each rep runs every
    setting in turn, so that a drift of the card does not read as a difference between them."""
    cfg = model.cfg
    device = next(model.parameters()).device
    blocks = -(-(n + 1) // BLOCK)
    cache = KVCache(cfg, blocks, BLOCK, 1, device, next(model.parameters()).dtype)
    runner = ModelRunner(model, cache, cfg.index_topk, prefill_chunk=chunk or n)
    gen = torch.Generator().manual_seed(n)
    prompt = torch.randint(0, cfg.vocab_size, (n,), generator=gen).tolist()
    seq = Sequence(request_id="p", prompt_ids=prompt, params=SamplingParams(max_tokens=1), sparse=sparse,
                   max_total_tokens=n + 1, eos_token_id=-1, detokenizer=None)  # type: ignore[arg-type]
    seq.block_ids = cache.blocks.allocate(blocks)
    [seq.slot] = cache.slots.allocate(1)
    settings = settings or [("", [])]
    times: list[list[float]] = [[] for _ in settings]
    for i in range(reps + 1):
        for j, (_, switches) in enumerate(settings):
            before = decode_ab.apply(switches)
            cache.reset_slot(seq.slot)
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            logits = runner.prefill([seq])
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i:  # the first is the warm-up (and each setting's compilation)
                times[j].append((time.perf_counter() - start) * 1e3)
            decode_ab.apply(before)
    assert torch.isfinite(logits.float()).all(), "prefill produced non-finite logits"
    if profile and device.type == "cuda":
        def once(cache: KVCache = cache, runner: ModelRunner = runner) -> None:
            cache.reset_slot(seq.slot)
            runner.prefill([seq])
        bench_decode.kernel_profile(once, steps=1, top=25)
    del cache, runner
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ns", nargs="+", default=["8K", "32K", "128K"])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default="/tmp/prefill")
    p.add_argument("--chunk", type=int, default=None,
                   help="prefill in chunks of this many tokens (default: the whole prompt in one chunk)")
    p.add_argument("--compile", action="store_true", help="torch.compile the layers (CLSAModel.compile_layers)")
    p.add_argument("--profile", action="store_true", help="list one prefill's kernels by GPU time (torch.profiler)")
    p.add_argument("--no-silu-kernel", action="store_true",
                   help="the SwiGLU gate through torch's ops (inductor's fused kernel) instead of kernels.silu_mul")
    p.add_argument("--setting", action="append", type=decode_ab.parse_setting, default=None,
                   help="NAME:MODULE.ATTR=VALUE[,...] as in bench/decode_ab.py (NAME: alone = as the modules "
                        "stand): every variant timed under each, interleaved rep by rep; rows named variant/NAME")
    p.add_argument("--smoke", action="store_true", help="on the CPU, clsa-tiny shapes, N=300 and 1000")
    args = p.parse_args()
    layers.SILU_KERNEL = not args.no_silu_kernel
    if args.smoke:
        bench_decode.DEVICE = torch.device("cpu")
        args.ns, args.reps = ["300", "1000"], 1
    ns = [parse_n(n) for n in args.ns]
    rows = []
    for preset_name in ("transformer-4b", "clsa-4b"):
        names = [v for v in args.variants if VARIANTS[v][0] == preset_name]
        if not names:
            continue
        cfg = preset(preset_name)
        if args.smoke:
            cfg = dataclasses.replace(preset("clsa-tiny"), arch=cfg.arch, index_topk=32)
        model = random_model(cfg)
        model.fuse_projections()
        if args.compile:
            model.compile_layers()
        with torch.inference_mode():
            for n in ns:
                for name in names:
                    per_setting = prefill_times(model, n, VARIANTS[name][1], args.reps, args.profile, args.chunk,
                                                args.setting)
                    for (setting, _), times in zip(args.setting or [("", [])], per_setting, strict=True):
                        label = f"{name}/{setting}" if setting else name
                        ms = statistics.median(times)
                        rows.append({"variant": label, "setting": setting, "n": n, "prefill_ms": ms,
                                     "tok_s": n / ms * 1e3, "chunk": min(args.chunk or n, n), "times_ms": times})
                        log(f"prefill {label:12s} N={n:7d}: {ms:10.1f} ms  {n / ms * 1e3:10.0f} tok/s  (runs: "
                            + " ".join(f"{t:.1f}" for t in times) + ")")
        del model
        if bench_decode.DEVICE.type == "cuda":
            torch.cuda.empty_cache()
    chunking = f"chunks of {args.chunk}" if args.chunk else "one chunk"
    report = [f"== prefill of one prompt ({chunking}), median ms", f"{'N':>7} {'variant':>12} {'ms':>10} "
              f"{'tok/s':>10} {'vs transformer':>15}"]
    # against the Transformer under the same setting (or, timed only once, under the modules' own)
    by = {(r["variant"].split("/")[0], r["setting"], r["n"]): r for r in rows}
    for r in sorted(rows, key=lambda r: (r["n"], r["variant"])):
        t = by.get(("transformer", r["setting"], r["n"])) or next(
            (t for t in rows if t["variant"].startswith("transformer") and t["n"] == r["n"]), None)
        ratio = f"{t['prefill_ms'] / r['prefill_ms']:.2f}x" if t else "-"
        report.append(f"{r['n']:>7} {r['variant']:>12} {r['prefill_ms']:>10.1f} {r['tok_s']:>10.0f} {ratio:>15}")
    print("\n".join(report), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "prefill.json").write_text(json.dumps({"argv": sys.argv[1:], "rows": rows}, indent=1))
    (out / "prefill.txt").write_text("\n".join(report) + "\n")


if __name__ == "__main__":
    main()
