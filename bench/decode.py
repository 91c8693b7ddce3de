"""The decode step on one GPU: CLSA against a Transformer, dense YOCO and two CLSA baselines.

Every variant runs through the engine's own decode path - `DecodeGraphs`, one CUDA graph of the
whole step per batch size - with random bf16 weights of the paper's dimensions (DESIGN.md presets):

  transformer     transformer-4b: 32 layers, each with its own paged KV cache, dense decode
  dense-yoco      clsa-4b in DENSE mode: every cross layer over all positions of the shared cache
  per-layer-topk  clsa-4b with a top-k in every cross layer (DSA-style, nothing shared)
  torch-clsa      clsa-4b, torch scoring + torch.topk once per step, the rows gathered once, SDPA
  clsa            clsa-4b, one shared index, our kernels

The context is synthetic: each sequence holds N tokens of random K/V (and indexer keys, ring
buffers) in the paged cache, as a prefill would have left them, and decodes its next token; the
time of a step does not depend on the values. For each N and B it reports the median step time
(CUDA events over graph replays), tokens/s = B / step, the KV bytes per sequence, the ratios
against the Transformer and dense YOCO at the same (N, B), and a breakdown from partial graphs
of the same step: self layers (the Transformer's every layer), shared K/V + indexer + top-k,
cross layers, LM head, plus sampling (greedy, outside the graph).

B runs over --bs ("fit": the largest batch the variant fits in GPU memory at that N; "tfit": the
Transformer's, so every variant is also timed at the batch where the Transformer is at its limit).

GPU: python bench/decode.py --out DIR   (writes DIR/decode.json, DIR/decode.txt)
CPU smoke run (clsa-tiny shapes, the torch kernels, times meaningless): python bench/decode.py --smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kernels.decode_attention as decode_attention  # noqa: E402
import kernels.skinny_linear as skinny_linear  # noqa: E402
import services.engine.graph_step as graph_step  # noqa: E402
import services.engine.layers as layers  # noqa: E402
from services.engine.cache import KVCache  # noqa: E402
from services.engine.config import ModelConfig, preset  # noqa: E402
from services.engine.graph_step import DecodeGraphs  # noqa: E402
from services.engine.model import CLSAModel  # noqa: E402
from services.engine.sampling import SamplingParams  # noqa: E402
from services.engine.sequence import Sequence  # noqa: E402

BLOCK = 16
GiB = 2**30
MARGIN = 10 * GiB  # left free for activations, workspaces and the graphs' pool
MAX_FIT = 256
SMOKE_FIT = 4
DEVICE = torch.device("cuda")
PROFILE = False  # --profile: the kernels of every step measured
KEEP_LOGITS = False  # each row keeps its step's logits ("logits", a CPU tensor; bench/decode_ab.py compares them)


@dataclass(frozen=True)
class Variant:
    name: str
    preset: str
    sparse: bool
    policy: str


VARIANTS = {v.name: v for v in (
    Variant("transformer", "transformer-4b", False, "shared"),
    Variant("dense-yoco", "clsa-4b", False, "shared"),
    Variant("per-layer-topk", "clsa-4b", True, "per_layer"),
    Variant("torch-clsa", "clsa-4b", True, "torch_gather"),
    Variant("clsa", "clsa-4b", True, "shared"),
)}


def log(msg: str) -> None:
    print(f"[decode {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def random_model(cfg: ModelConfig) -> CLSAModel:
    """clsa-4b-sized weights straight on the GPU, bf16, N(0, 0.02) (norms 1); fp32 on the CPU."""
    dtype = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in bf16: no fp32 copy left in the allocator's cache
    try:
        with DEVICE:
            model = CLSAModel(cfg).eval().requires_grad_(False)  # inference: no autograd in the compiled layers
    finally:
        torch.set_default_dtype(default)
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    return model


def per_sequence_bytes(cfg: ModelConfig, n: int) -> int:
    tokens = -(-(n + 1) // BLOCK) * BLOCK
    ring = 2 * cfg.n_self_layers * cfg.swa_window * cfg.n_kv_heads * cfg.head_dim * 2
    return tokens * cfg.kv_bytes_per_token(2) + ring


def fits(cfg: ModelConfig, n: int) -> int:
    if DEVICE.type != "cuda":
        return SMOKE_FIT
    free, _ = torch.cuda.mem_get_info()
    return max(0, min(MAX_FIT, (free - MARGIN) // per_sequence_bytes(cfg, n)))


def synthetic_batch(cache: KVCache, cfg: ModelConfig, n: int, batch: int, sparse: bool) -> list[Sequence]:
    """`batch` sequences that hold `n` tokens each (blocks, ring slot, ring positions) and decode
    their next one."""
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    seqs = []
    for i in range(batch):
        seq = Sequence(request_id=f"s{i}", prompt_ids=[1] * n, params=params, sparse=sparse,
                       max_total_tokens=n + 1, eos_token_id=-1, detokenizer=None)  # type: ignore[arg-type]
        seq.output_ids.append(2)  # the token this step decodes, at position n
        seq.block_ids = cache.blocks.allocate(-(-(n + 1) // BLOCK))
        [seq.slot] = cache.slots.allocate(1)
        if cfg.is_yoco:
            window = cfg.swa_window
            last = torch.arange(max(0, n - window), n, device=DEVICE)
            cache.swa_pos[seq.slot, last % window] = last
        seqs.append(seq)
    return seqs


def release(cache: KVCache, seqs: list[Sequence]) -> None:
    for seq in seqs:
        cache.blocks.free(seq.block_ids)
        cache.slots.free([seq.slot])


def median_ms(fn, reps: int) -> float:  # noqa: ANN001
    for _ in range(3):
        fn()
    if DEVICE.type != "cuda":
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def kernel_profile(step, steps: int = 5, top: int = 30) -> dict:  # noqa: ANN001
    """The step's kernels by total GPU time per step (torch.profiler over `steps` replays), and
    by their share of the step's critical path (bench/critical_path.py: with PDL the kernels
    overlap, so their own times add up to more than the step)."""
    import tempfile

    from critical_path import from_profile, report  # bench/critical_path.py
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    totals: dict[str, list[float]] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            entry = totals.setdefault(event.name, [0.0, 0])
            entry[0] += event.device_time_total / steps
            entry[1] += 1 / steps
    rows = sorted(({"kernel": name[:90], "us_per_step": us, "calls_per_step": calls}
                   for name, (us, calls) in totals.items()), key=lambda r: -r["us_per_step"])
    total = sum(r["us_per_step"] for r in rows)
    log(f"kernels: {total:.0f} us of GPU time per step in {sum(r['calls_per_step'] for r in rows):.0f} launches")
    for r in rows[:top]:
        log(f"  {r['us_per_step']:8.1f} us  x{r['calls_per_step']:5.1f}  {r['kernel']}")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            critical = from_profile(prof, steps, Path(tmp) / "trace.json")
        except ValueError as exc:  # e.g. a kernel the profiler dropped: the totals above still hold
            log(f"critical path: {exc}")
            critical = None
    if critical is not None:
        for line in report(critical, top):
            log(line)
    return {"kernels": rows[:top], "critical_path": critical}


def stage_breakdown(graphs: DecodeGraphs, seqs: list[Sequence], sparse: bool, yoco: bool, step_ms: float,
                    reps: int) -> dict[str, float]:
    """Where the step's time goes, from graphs of the same step stopped early (`STAGES`)."""
    ends = {upto: median_ms(graphs.prepare(seqs, sparse, upto), reps) for upto in (
        ("self", "index", "cross") if yoco else ("self",))}
    if not yoco:
        return {"layers": ends["self"], "head": step_ms - ends["self"]}
    return {"self layers": ends["self"], "shared KV + index": ends["index"] - ends["self"],
            "cross layers": ends["cross"] - ends["index"], "head": step_ms - ends["cross"]}


def run_variant(variant: Variant, model: CLSAModel, n: int, batches: list[int], reps: int,
                breakdown: bool) -> list[dict]:
    cfg = model.cfg
    biggest = max(batches)
    blocks = biggest * -(-(n + 1) // BLOCK) + 1
    cache = KVCache(cfg, blocks, BLOCK, biggest + 1, DEVICE, next(model.parameters()).dtype)
    for t in (cache.k, cache.v, cache.k_idx, cache.swa_k, cache.swa_v):
        t.normal_()
    graphs = DecodeGraphs(model, cache, cfg.index_topk, biggest, policy=variant.policy, max_seq_len=n + BLOCK,
                          buckets=tuple(batches))
    rows = []
    for batch in batches:
        seqs = synthetic_batch(cache, cfg, n, batch, variant.sparse)
        try:
            step = graphs.prepare(seqs, variant.sparse)
            ms = median_ms(step, reps)
            logits = step()
            sample_ms = median_ms(lambda logits=logits: logits.argmax(dim=-1).tolist(), reps)
            row = {"variant": variant.name, "n": n, "b": batch, "step_ms": ms, "tok_s": batch / ms * 1e3,
                   "kv_bytes_per_seq": per_sequence_bytes(cfg, n), "sample_ms": sample_ms,
                   "finite": bool(torch.isfinite(logits[:batch].float()).all())}
            if breakdown:
                row["breakdown_ms"] = stage_breakdown(graphs, seqs, variant.sparse, cfg.is_yoco, ms, reps)
            if KEEP_LOGITS:
                row["logits"] = logits[:batch].float().cpu()
            if PROFILE and DEVICE.type == "cuda":
                row.update(kernel_profile(step))
            rows.append(row)
            log(f"{variant.name:15s} N={n:6d} B={batch:3d}: {ms:8.3f} ms  {row['tok_s']:9.0f} tok/s"
                + (f"  {row['breakdown_ms']}" if breakdown else ""))
        except torch.OutOfMemoryError as exc:  # reported in the table; the next batch still runs
            log(f"{variant.name} N={n} B={batch}: out of memory ({str(exc)[:80]})")
            rows.append({"variant": variant.name, "n": n, "b": batch, "error": "out of memory"})
        finally:
            release(cache, seqs)
    graphs.close()
    del graphs, cache
    torch.cuda.empty_cache()
    return rows


def parse_n(text: str) -> int:
    return int(text[:-1]) * 1024 if text.upper().endswith("K") else int(text)


def batches_for(spec: list[str], fit: int, tfit: int) -> list[int]:
    out = set()
    for s in spec:
        b = fit if s == "fit" else tfit if s == "tfit" else int(s)
        if 1 <= b <= fit:
            out.add(b)
    return sorted(out)


def print_tables(rows: list[dict], report: list[str]) -> None:
    def line(text: str = "") -> None:
        print(text, flush=True)
        report.append(text)

    ok = [r for r in rows if "step_ms" in r]
    by = {(r["variant"], r["n"], r["b"]): r for r in ok}
    line("== decode step (CUDA graph of the whole step, median ms), tokens/s, ratios at the same N and B")
    line(f"{'N':>7} {'B':>4} {'variant':>15} {'step_ms':>9} {'tok/s':>9} {'KV MiB/seq':>11} {'vs transformer':>15}"
         f" {'vs dense-yoco':>14}  breakdown (ms)")
    for r in sorted(ok, key=lambda r: (r["n"], r["b"], list(VARIANTS).index(r["variant"]))):
        t = by.get(("transformer", r["n"], r["b"]))
        d = by.get(("dense-yoco", r["n"], r["b"]))
        vs_t = f"{t['step_ms'] / r['step_ms']:.2f}x" if t else "-"
        vs_d = f"{d['step_ms'] / r['step_ms']:.2f}x" if d else "-"
        parts = " ".join(f"{k} {v:.3f}" for k, v in r.get("breakdown_ms", {}).items())
        line(f"{r['n']:>7} {r['b']:>4} {r['variant']:>15} {r['step_ms']:>9.3f} {r['tok_s']:>9.0f}"
             f" {r['kv_bytes_per_seq'] / 2**20:>11.0f} {vs_t:>15} {vs_d:>14}  {parts}")
    line()
    line("== largest batch each variant fits, decode throughput")
    for n in sorted({r["n"] for r in ok}):
        best = {}
        for r in ok:
            if r["n"] == n and (r["variant"] not in best or r["b"] > best[r["variant"]]["b"]):
                best[r["variant"]] = r
        t = best.get("transformer")
        for name, r in sorted(best.items(), key=lambda kv: list(VARIANTS).index(kv[0])):
            ratio = f"  {r['tok_s'] / t['tok_s']:.1f}x the transformer's" if t else ""
            line(f"  N={n:>6} {name:>15}: B={r['b']:>3}  {r['tok_s']:>9.0f} tok/s{ratio}")


def write_json(out: Path, device_name: str, tfit: dict, rows: list[dict], partial: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode.json").write_text(json.dumps({"device": device_name, "torch": torch.__version__,
                                                 "argv": sys.argv[1:], "partial": partial,
                                                 "transformer_fit": tfit, "rows": rows}, indent=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ns", nargs="+", default=["8K", "32K", "128K"])
    p.add_argument("--bs", nargs="+", default=["1", "8", "32", "tfit", "fit"])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--no-breakdown", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the layers (CLSAModel.compile_layers)")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. max-autotune-no-cudagraphs")
    p.add_argument("--fuse", action="store_true", help="stacked projection weights (CLSAModel.fuse_projections)")
    p.add_argument("--profile", action="store_true", help="list each step's kernels by GPU time (torch.profiler)")
    p.add_argument("--no-skinny", action="store_true",
                   help="decode projections through cuBLAS and separate norm/SiLU/residual kernels (layers.SKINNY off)")
    p.add_argument("--skinny-prefetch", action="store_true",
                   help="the skinny GEMM's weight slice prefetched to L2 before its PDL wait "
                        "(skinny_linear.PREFETCH_L2)")
    p.add_argument("--skinny-pre-wait-tiles", type=int, default=None, choices=(1, 2, 3),
                   help="weight tiles a skinny-GEMM program loads before its PDL wait (skinny_linear.PRE_WAIT_TILES)")
    p.add_argument("--skinny-weight-eviction", default=None, choices=skinny_linear.EVICTION_POLICIES,
                   help="L2 eviction policy of the skinny GEMM's weight loads (skinny_linear.WEIGHT_EVICTION)")
    p.add_argument("--sparse-kv-eviction", default=None, choices=skinny_linear.EVICTION_POLICIES,
                   help="L2 eviction policy of the sparse kernels' K/V loads (triton_attention.SPARSE_KV_EVICTION)")
    p.add_argument("--dense-kv-eviction", default=None, choices=skinny_linear.EVICTION_POLICIES,
                   help="L2 eviction policy of the ring kernels' K/V loads (triton_attention.DENSE_KV_EVICTION)")
    p.add_argument("--no-fused-qkv", action="store_true",
                   help="q/k/v, RoPE and ring writes as separate kernels (graph_step.FUSED_QKV_RING off)")
    p.add_argument("--attention-pdl-max-batch", type=int, default=None,
                   help="launch the attention kernels with PDL up to this batch (decode_attention.PDL_MAX_BATCH)")
    p.add_argument("--sparse-small-max-batch", type=int, default=None,
                   help="sparse attention's one-launch configuration (fused merge) up to this batch "
                        "(decode_attention.SMALL_BATCH)")
    p.add_argument("--dense-fused-max-batch", type=int, default=None,
                   help="dense (ring) attention merges in its last split up to this batch "
                        "(decode_attention.DENSE_FUSED_MAX_BATCH)")
    p.add_argument("--switches", default=None,
                   help="module switches set before the run, MODULE.ATTR[KEY]=VALUE[,...] (bench/decode_ab.py's "
                        "setting syntax, without the name), e.g. the winners of an A/B")
    p.add_argument("--out", default="/tmp/decode")
    p.add_argument("--smoke", action="store_true", help="on the CPU, clsa-tiny shapes, N=200 and 300")
    args = p.parse_args()
    if args.switches:
        from decode_ab import apply, parse_setting  # bench/decode_ab.py

        _, switches = parse_setting(f"switches:{args.switches}")
        apply(switches)
        log(f"switches: {args.switches}")
    global DEVICE, PROFILE
    PROFILE = args.profile
    layers.SKINNY = not args.no_skinny
    skinny_linear.PREFETCH_L2 = args.skinny_prefetch
    graph_step.FUSED_QKV_RING = not args.no_fused_qkv
    if args.skinny_pre_wait_tiles is not None:
        skinny_linear.PRE_WAIT_TILES = args.skinny_pre_wait_tiles
    if args.skinny_weight_eviction is not None:
        skinny_linear.WEIGHT_EVICTION = args.skinny_weight_eviction
    if args.sparse_kv_eviction is not None or args.dense_kv_eviction is not None:
        import kernels.triton_attention as triton_attention
        if args.sparse_kv_eviction is not None:
            triton_attention.SPARSE_KV_EVICTION = args.sparse_kv_eviction
        if args.dense_kv_eviction is not None:
            triton_attention.DENSE_KV_EVICTION = args.dense_kv_eviction
    if args.attention_pdl_max_batch is not None:
        decode_attention.PDL_MAX_BATCH = args.attention_pdl_max_batch
    if args.sparse_small_max_batch is not None:
        decode_attention.SMALL_BATCH = args.sparse_small_max_batch
    if args.dense_fused_max_batch is not None:
        decode_attention.DENSE_FUSED_MAX_BATCH = args.dense_fused_max_batch
    if args.smoke:
        DEVICE = torch.device("cpu")
        args.ns, args.reps = ["200", "300"], 2
    ns = [parse_n(n) for n in args.ns]
    device_name = torch.cuda.get_device_properties(0).name if DEVICE.type == "cuda" else "cpu"
    report = [f"decode benchmark {time.strftime('%Y-%m-%dT%H:%M:%S')}  {device_name}  torch {torch.__version__}"]
    rows: list[dict] = []
    models: dict[str, CLSAModel] = {}
    tfit = {}
    for preset_name in ("transformer-4b", "clsa-4b"):
        wanted = [v for v in args.variants if VARIANTS[v].preset == preset_name]
        if not wanted and not (preset_name == "transformer-4b" and "tfit" in args.bs):
            continue
        cfg = preset(preset_name)
        if args.smoke:  # clsa-tiny's shapes in both architectures
            cfg = dataclasses.replace(preset("clsa-tiny"), arch=cfg.arch, index_topk=32)
        model = models[preset_name] = random_model(cfg)
        if args.fuse:
            model.fuse_projections()
        if args.compile:
            model.compile_layers(args.compile_mode)
        log(f"{preset_name}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters")
        for n in ns:
            fit = fits(cfg, n)
            if preset_name == "transformer-4b":
                tfit[n] = fit
            batches = batches_for(args.bs, fit, tfit.get(n, fit))
            log(f"{preset_name} N={n}: fits {fit} sequences; batches {batches}")
            for name in wanted:
                rows += run_variant(VARIANTS[name], model, n, batches, args.reps, not args.no_breakdown)
                write_json(Path(args.out), device_name, tfit, rows, partial=True)  # kept if a later one dies
        del models[preset_name], model
        torch.cuda.empty_cache()
    print_tables(rows, report)
    out = Path(args.out)
    write_json(out, device_name, tfit, rows, partial=False)
    (out / "decode.txt").write_text("\n".join(report) + "\n")


if __name__ == "__main__":
    main()
