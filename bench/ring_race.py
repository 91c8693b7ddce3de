"""Does a self layer's ring attention read its own token's row before the fused q/k/v kernel has
written it? The decode step's self layers are, in a chain of PDL launches, `skinny_qkv` (the q/k/v
projection, RoPE, and the token's K/V written into its ring row; it lets the next kernel start
before it ends) and then the dense decode kernel over the ring. If that kernel loads its first K/V
block before its PDL wait (`kv_before_wait=True`), the row of the token being decoded may still
hold the token W steps back. Three ways to read the ring: all of it before the wait (the race), all
of it after (`kv_before_wait=False`), or all before but the token's own row read again after it
(`fresh=ring_rows`, what the decode step does).

clsa-4b's shapes (d_model 3072, 24 query / 8 KV heads of 128, window 512), B = 7, 16 layers of
qkv -> ring attention in one CUDA graph; each replay decodes one position further (each sequence's
ring row advances, so the row written is new every replay). After each replay, every layer's ring
attention is recomputed alone (nothing running before it, the same way of reading) over the rings as
the replay left them, from the replay's own queries; the kernel is deterministic, so a correct
replay matches it bit for bit. Prints, for each way, the layers that did not match and the time per replay.

Run on the GPU: `python bench/ring_race.py` (about 20 s); writes ring_race.json. `--check`: exit 1
if a way the step may take (after the wait, or the fresh row) mismatched.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import triton
from sweep_kernels import graph_of  # puts the project's root ahead of bench/ (bench/kernels.py)

from kernels import dense_decode_attention
from kernels.skinny_linear import skinny_qkv

D_MODEL, HQ, HKV, D, W, LAYERS = 3072, 24, 8, 128, 512, 16


MODES = {"before wait": {"kv_before_wait": True}, "after wait": {"kv_before_wait": False},
         "fresh row": {"kv_before_wait": True, "fresh": True}}


def run_setting(mode: str, batch: int, replays: int, seed: int = 0) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    dev, bf16 = "cuda", torch.bfloat16
    n_out = (HQ + 2 * HKV) * D

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, device=dev) * scale).to(bf16)

    x = rand(batch, D_MODEL)
    ws = [rand(n_out, D_MODEL, scale=D_MODEL ** -0.5) for _ in range(LAYERS)]
    norm = torch.ones(D_MODEL, device=dev, dtype=bf16)
    rings = [(rand(batch + 1, W, HKV, D), rand(batch + 1, W, HKV, D)) for _ in range(LAYERS)]
    slots = torch.arange(batch, device=dev, dtype=torch.int64)
    ring_rows = torch.randint(0, W, (batch,), generator=gen, device=dev)
    angle = torch.rand(batch, D // 2, generator=gen, device=dev) * 6.28
    cos, sin = angle.cos(), angle.sin()
    table = slots[:, None].to(torch.int32)
    lens = torch.full((batch,), W, device=dev, dtype=torch.int32)
    scale = 1 / math.sqrt(D)
    outs = torch.empty(LAYERS, batch, HQ, D, device=dev, dtype=bf16)
    read = {"kv_before_wait": MODES[mode]["kv_before_wait"], "fresh": ring_rows if MODES[mode].get("fresh") else None}
    workspace: dict = {}

    def chain() -> None:
        for i, (rk, rv) in enumerate(rings):
            y = skinny_qkv(x, ws[i], norm, 1e-6, cos, sin, HQ, HKV, rk, rv, slots, ring_rows)
            q = y[:, : HQ * D].view(batch, HQ, D)
            dense_decode_attention(q, rk, rv, table, lens, scale, out=outs[i], workspace=workspace, **read)
            queries[i] = q  # the graph's own buffer: what each replay's attention read

    queries: list[torch.Tensor] = [outs[0]] * LAYERS
    graph = graph_of(chain)
    mismatched = 0
    worst = 0.0
    for _ in range(replays):
        ring_rows.add_(1).remainder_(W)  # the next position: a row the replay has not written yet
        graph.replay()
        torch.cuda.synchronize()
        for i, (rk, rv) in enumerate(rings):
            want = dense_decode_attention(queries[i], rk, rv, table, lens, scale, **read)  # nothing ahead of it
            if not torch.equal(outs[i], want):
                mismatched += 1
                worst = max(worst, (outs[i].float() - want.float()).abs().max().item())
    us = 1000 * triton.testing.do_bench(graph.replay, warmup=10, rep=100, return_mode="median")
    return {"mode": mode, "B": batch, "replays": replays, "layers": LAYERS,
            "mismatched_layers": mismatched, "worst_abs_diff": worst, "us_per_replay": round(us, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bs", type=int, nargs="+", default=[7, 1])
    parser.add_argument("--replays", type=int, default=50)
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/ring_race.py runs kernels on a GPU: no CUDA device here")
    rows = []
    print(f"{torch.cuda.get_device_name()}: {LAYERS} layers of skinny_qkv -> ring attention, one CUDA graph")
    print(f"{'B':>2} {'K/V read':<14} {'layers off':>11} {'of':>5} {'max |diff|':>11} {'us/replay':>10}")
    for batch in args.bs:
        for mode in MODES:
            r = run_setting(mode, batch, args.replays)
            rows.append(r)
            print(f"{batch:>2} {mode:<14} {r['mismatched_layers']:>11} "
                  f"{args.replays * LAYERS:>5} {r['worst_abs_diff']:>11.4g} {r['us_per_replay']:>10.2f}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ring_race.json").write_text(json.dumps({"device": torch.cuda.get_device_name(), "results": rows},
                                                   indent=1))
    if args.check and any(r["mismatched_layers"] for r in rows if r["mode"] != "before wait"):
        raise SystemExit("a ring attention the step may run (after the wait, or the fresh row) mismatched")


if __name__ == "__main__":
    main()
