"""Does a persisting-L2 window keep a buffer on chip across a CUDA graph of weight-streaming
layers? A stand-in for CLSA's cross layers (GPU, about a minute).

Each of `--layers` layers reads its own weight (`--weight-mb`, one skinny F.linear at M = 7, as
the decode step's projections) and then the same "selected rows" buffer (`--selected-mib`, a
torch sum over all of it, as every cross layer's sparse attention reads the one set of selected
rows). Timed as one CUDA graph per variant (median of `--reps` replays): the selected-rows reads
alone, the weights alone, both, and both again with the buffer under an access-policy window
(kernels/l2_persist.py: set on every kernel node of the graph, the set-aside at the device's
maximum, the hit ratio what fits) - with the rest of the window's lines streaming or normal.

    python bench/l2_persist.py [--selected-mib 56] [--weight-mb 189] [--layers 16] [--out DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels import l2_persist  # noqa: E402


def graph_ms(fn, stream: torch.cuda.Stream, reps: int, window: tuple | None = None) -> tuple[float, float]:  # noqa: ANN001
    """(median ms of one replay, hit ratio) of `fn` captured on `stream`, under `window` ((buffer,
    persisting bytes, miss property)) when given (hit ratio 0.0 without)."""
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph(keep_graph=window is not None)
    with torch.cuda.graph(graph, stream=stream):
        fn()
    ratio = 0.0
    if window is not None:
        buffer, persisting, miss = window
        ratio = l2_persist.set_graph_window(graph.raw_cuda_graph(), buffer, persisting, miss)
        windows = l2_persist.graph_windows(graph.raw_cuda_graph())
        assert windows and all(n > 0 for _, n, _ in windows), windows
        graph.instantiate()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times[1:]), ratio


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--selected-mib", type=float, nargs="+", default=[56.0, 8.0])
    p.add_argument("--weight-mb", type=float, default=189.0)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    dev = torch.device("cuda")
    lim = l2_persist.limits(dev)
    print(f"{torch.cuda.get_device_name(dev)}: L2 {lim.l2_bytes / 2**20:.1f} MiB, persisting at most "
          f"{lim.max_persisting_bytes / 2**20:.1f} MiB, window at most {lim.max_window_bytes / 2**20:.1f} MiB")
    k = 3072
    n = int(args.weight_mb * 1e6 / 2 / k) // 128 * 128
    weights = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) for _ in range(args.layers)]
    x = torch.randn(7, k, device=dev, dtype=torch.bfloat16)
    stream = torch.cuda.Stream()
    rows = []
    for sel_mib in args.selected_mib:
        selected = torch.randn(int(sel_mib * 2**20 / 2 / 1024), 1024, device=dev, dtype=torch.bfloat16)

        def reads(selected: torch.Tensor = selected) -> None:
            for _ in range(args.layers):
                selected.sum(0)

        def gemms() -> None:
            for w in weights:
                F.linear(x, w)

        def both(selected: torch.Tensor = selected) -> None:
            for w in weights:
                F.linear(x, w)
                selected.sum(0)

        persisting = l2_persist.set_aside(dev, lim.max_persisting_bytes)
        variants = [("selected reads alone", reads, None), ("weights alone", gemms, None), ("both", both, None),
                    ("both, window (miss streaming)", both, (selected, persisting, l2_persist.ACCESS_STREAMING)),
                    ("both, window (miss normal)", both, (selected, persisting, l2_persist.ACCESS_NORMAL)),
                    ("reads alone, window", reads, (selected, persisting, l2_persist.ACCESS_STREAMING))]
        for name, fn, window in variants:
            ms, ratio = graph_ms(fn, stream, args.reps, window)
            rows.append({"selected_mib": sel_mib, "variant": name, "ms": ms, "hit_ratio": ratio,
                         "persisting_mib": persisting / 2**20 if window else 0})
            print(f"selected {sel_mib:5.1f} MiB  {name:32s} {ms:8.3f} ms  ({ms / args.layers * 1e3:6.1f} us a layer)"
                  + (f"  hit ratio {ratio:.2f}" if window else ""))
        l2_persist.set_aside(dev, 0)
        l2_persist.reset(dev)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "l2_persist.json").write_text(json.dumps(
            {"device": torch.cuda.get_device_name(dev), "limits": dataclasses.asdict(lim), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
