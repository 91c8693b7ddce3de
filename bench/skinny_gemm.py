"""The skinny-GEMM kernel (kernels/skinny_linear.py) against cuBLAS on the decode step's projections.

Three parts, one GPU run (tables printed, DIR/skinny_gemm.json written):

1. sweep: for each clsa-4b projection with the fusion the model gives it (norm before q/k/v, the
   cross query, gate/up and the LM head; SiLU before down; the residual after the output and down
   projections), every (BLOCK_N, BLOCK_K, programs: how far K is split) of the grid, then warps
   and stages for the best, at M = --sweep-m, timed as
   gemm_shapes.py times cuBLAS: 16 calls in one CUDA graph, each on its own copy of the weight.
2. rows: the best config of each shape at every M in --ms, with and without programmatic
   dependent launch (and with the L2 prefetch of each program's weight slice before its wait,
   `skinny_linear.PREFETCH_L2`), against F.linear alone and against the unfused torch ops (norm / SiLU /
   residual kernels included) - each result checked against the fp32 reference first.
3. layers: 16 decoder layers' projections in a dependent chain (norm + q/k/v, output + residual,
   norm + gate/up, SiLU + down + residual; the attention replaced by the q slice), the kernel
   against the torch ops, per layer.

GPU: python bench/skinny_gemm.py --out DIR   (about 4 minutes)
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gemm_shapes import COPIES, graph_us, shapes  # noqa: E402

import kernels.skinny_linear as sl  # noqa: E402

FUSION = {"qkv": "norm", "wo": "residual", "cross_wq": "norm", "gate_up": "norm", "down": "silu+residual",
          "lm_head": "norm"}
# (BLOCK_N, BLOCK_K, programs) at 4 warps, 3 stages; then warps and stages for the best of them.
GRID = list(itertools.product((32, 64, 128), (128, 256, 512), (132, 240, 264, 396, 528)))
WARPS_STAGES = ((4, 2), (8, 3), (8, 4), (2, 3))


class Case:
    """One projection's inputs at M rows, COPIES weights."""

    def __init__(self, name: str, n: int, k: int, m: int, dev: torch.device) -> None:
        fusion = FUSION[name]
        self.silu, self.norm, self.res = "silu" in fusion, "norm" in fusion, "residual" in fusion
        self.ws = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(COPIES)]
        self.x = torch.randn(m, 2 * k if self.silu else k, device=dev, dtype=torch.bfloat16)
        self.nw = torch.rand(k, device=dev, dtype=torch.bfloat16) + 0.5 if self.norm else None
        self.r = torch.randn(m, n, device=dev, dtype=torch.bfloat16) if self.res else None
        self.out = torch.empty(m, n, device=dev, dtype=torch.bfloat16)
        self.nbytes = n * k * 2

    def kernel(self, cfg: tuple[int, ...], pdl: bool, prefetch: bool = False):  # noqa: ANN201
        n, k = self.ws[0].shape

        def run() -> list[torch.Tensor]:  # the config and flags are read at capture: a graph keeps them
            sl.SKINNY_CONFIGS[(n, k)], sl.PDL, sl.PREFETCH_L2 = tuple(cfg), pdl, prefetch
            return [sl.skinny_linear(self.x, wt, self.nw, 1e-6, self.silu, self.r) for wt in self.ws]
        return run

    def torch_ops(self):  # noqa: ANN201
        return lambda: [sl.skinny_linear_reference(self.x, wt, self.nw, 1e-6, self.silu, self.r) for wt in self.ws]

    def linear_only(self):  # noqa: ANN201
        x = self.x[:, : self.ws[0].shape[1]]
        return lambda: [torch.nn.functional.linear(x, wt) for wt in self.ws]

    def error(self, cfg: tuple[int, ...]) -> float:
        got = self.kernel(cfg, False)()[-1]
        nw, r = (None if t is None else t.float() for t in (self.nw, self.r))
        ref = sl.skinny_linear_reference(self.x.float(), self.ws[-1].float(), nw, 1e-6, self.silu, r)
        return float((got.float() - ref).abs().max() / ref.abs().max())


def timings(case: Case, name: str, configs: list[tuple[int, ...]]) -> list[tuple[float, tuple[int, ...]]]:
    """(us per call, config) of each config the card can run."""
    timed = []
    for cfg in configs:
        try:
            timed.append((graph_us(case.kernel(cfg, True), COPIES), cfg))
        except Exception as exc:  # noqa: BLE001 - a config the card cannot run (shared memory)
            print(f"   {name} {cfg}: {type(exc).__name__}")
    return timed


def sweep(dev: torch.device, m: int) -> dict[str, dict]:
    print(f"== sweep at M = {m}: us per call (16 calls, own weights), PDL on")
    best = {}
    for name, (n, k) in shapes().items():
        case = Case(name, n, k, m, dev)
        t0 = time.time()
        timed = timings(case, name, [(bn, bk, programs, 4, 3) for bn, bk, programs in GRID])
        bn, bk, programs, _, _ = min(timed)[1]
        timed += timings(case, name, [(bn, bk, programs, w, s) for w, s in WARPS_STAGES])
        timed.sort()
        us, cfg = timed[0]
        best[name] = {"config": list(cfg), "us": us, "top5": [[t, list(c)] for t, c in timed[:5]]}
        print(f"{name:>9} N={n:>6} K={k:>5}: best {cfg} {us:6.1f} us ({case.nbytes / us / 1e6:.2f} TB/s); "
              f"next {', '.join(f'{c} {t:.1f}' for t, c in timed[1:4])}  [{time.time() - t0:.0f} s]", flush=True)
        del case
    return best


def rows(dev: torch.device, best: dict[str, dict], ms: list[int]) -> list[dict]:
    print("== best config per shape, us per call: kernel with / without PDL, F.linear alone, torch ops")
    out = []
    for name, (n, k) in shapes().items():
        cfg = tuple(best[name]["config"])
        for m in ms:
            case = Case(name, n, k, m, dev)
            try:
                err = case.error(cfg)
            except Exception as exc:  # noqa: BLE001 - BLOCK_M grows with M: shared memory may not suffice
                print(f"{name:>9} M={m:>3}: {cfg} fails ({type(exc).__name__})")
                continue
            res = {"pdl": graph_us(case.kernel(cfg, True), COPIES), "no_pdl": graph_us(case.kernel(cfg, False), COPIES),
                   "pdl_prefetch": graph_us(case.kernel(cfg, True, True), COPIES),
                   "linear": graph_us(case.linear_only(), COPIES), "torch_ops": graph_us(case.torch_ops(), COPIES)}
            out.append({"shape": name, "fusion": FUSION[name], "n": n, "k": k, "m": m, "config": list(cfg),
                        "rel_err": err, **{f"{key}_us": us for key, us in res.items()},
                        "pdl_tbs": case.nbytes / res["pdl"] / 1e6})
            print(f"{name:>9} M={m:>3} {FUSION[name]:>14}: pdl {res['pdl']:6.1f} ({case.nbytes / res['pdl'] / 1e6:.2f}"
                  f" TB/s)  +prefetch {res['pdl_prefetch']:6.1f}  no-pdl {res['no_pdl']:6.1f}"
                  f"  F.linear {res['linear']:6.1f}  torch ops "
                  f"{res['torch_ops']:6.1f}   err {err:.1e}", flush=True)
            del case
    sl.PDL, sl.PREFETCH_L2 = True, False
    return out


def layers(dev: torch.device, ms: list[int], n_layers: int = 16) -> list[dict]:
    """us per layer of the projections of a self-decoder layer chain, kernel vs torch ops."""
    sh = shapes()
    (nq, d), (_, q), (nf, _), (_, f) = sh["qkv"], sh["wo"], sh["gate_up"], sh["down"]
    ws = [{key: torch.randn(*shape, device=dev, dtype=torch.bfloat16) * 0.02
           for key, shape in (("qkv", (nq, d)), ("wo", (d, q)), ("gate_up", (nf, d)), ("down", (d, f)))}
          for _ in range(n_layers)]
    g1, g2 = (torch.rand(d, device=dev, dtype=torch.bfloat16) + 0.5 for _ in range(2))
    print(f"== {n_layers} layers' projections in a chain, us per layer")
    out = []
    for m in ms:
        x0 = torch.randn(m, d, device=dev, dtype=torch.bfloat16)

        def chain(fn, x0=x0):  # noqa: ANN001, ANN202
            def run() -> torch.Tensor:
                x = x0
                for w in ws:
                    attn = fn(x, w["qkv"], g1, False, None)[:, :q]
                    x = fn(attn, w["wo"], None, False, x)
                    h = fn(x, w["gate_up"], g2, False, None)
                    x = fn(h, w["down"], None, True, x)
                return x
            return run

        kern = chain(lambda x, w, g, silu, r: sl.skinny_linear(x, w, g, 1e-6, silu, r))
        ref = chain(lambda x, w, g, silu, r: sl.skinny_linear_reference(x, w, g, 1e-6, silu, r))
        try:
            err = float((kern().float() - ref().float()).abs().max() / ref().float().abs().max())
            t_k, t_r = graph_us(kern, n_layers), graph_us(ref, n_layers)
            sl.PREFETCH_L2 = True
            t_p = graph_us(kern, n_layers)
        except Exception as exc:  # noqa: BLE001 - as in rows()
            print(f"M={m:>3}: fails ({type(exc).__name__})")
            continue
        finally:
            sl.PREFETCH_L2 = False
        out.append({"m": m, "kernel_us": t_k, "kernel_prefetch_us": t_p, "torch_us": t_r, "rel_err": err})
        print(f"M={m:>3}: kernel {t_k:6.1f} us/layer  with L2 prefetch {t_p:6.1f}  torch ops {t_r:6.1f}  saved "
              f"{t_r - t_k:5.1f}  err {err:.1e}", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sweep-m", type=int, default=7)
    p.add_argument("--ms", nargs="+", type=int, default=[1, 7, 16, 32, 64])
    p.add_argument("--no-sweep", action="store_true", help="skip the sweep: SKINNY_CONFIG for every shape")
    p.add_argument("--out", default="/tmp/skinny_gemm")
    args = p.parse_args()
    dev = torch.device("cuda")
    best = ({name: {"config": list(sl.SKINNY_CONFIG)} for name in shapes()} if args.no_sweep
            else sweep(dev, args.sweep_m))
    sl.SKINNY_CONFIGS.update({shapes()[name]: tuple(b["config"]) for name, b in best.items()})
    result = {"device": torch.cuda.get_device_name(), "best": best, "rows": rows(dev, best, args.ms),
              "layers": layers(dev, args.ms)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "skinny_gemm.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
