"""Which kernels a decode step's time is made of, when its kernels overlap (PDL).

In a chain of programmatic-dependent launches a kernel starts while the one before it still runs,
so the kernels' own durations add up to more than the step: each includes the time it waited.
What the step is made of is the critical path: walk one replay's kernels in the order they end,
and charge each the time by which it moved the replay's end (its end minus the latest end before
it, or nothing). The charges add up to the replay's span, first start to last end, exactly.

`attribute(events, replays)` takes the profiler's kernel records (a Chrome trace's events of
category "kernel": name, ts, dur and args.grid, in microseconds), cuts them into `replays` equal
runs of consecutive kernels and returns the charge per kernel kind - its name and grid, which
tells the step's GEMM shapes apart - averaged over the replays, and the charge per position in
the step (the i-th kernel of every replay), which tells one layer's kernels from another's.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Kernel:
    name: str
    grid: tuple[int, ...]
    start: float  # us
    end: float

    @property
    def kind(self) -> str:
        short = self.name.split("(")[0].split("<")[0].strip()
        return f"{short[:60]} grid={'x'.join(map(str, self.grid))}"


def kernels_of(trace: dict) -> list[Kernel]:
    """The kernel records of a Chrome trace (torch.profiler's `export_chrome_trace`), by start."""
    out = []
    for e in trace.get("traceEvents", []):
        if e.get("cat") == "kernel" and e.get("ph") == "X":
            grid = tuple(int(g) for g in (e.get("args", {}).get("grid") or ()))
            out.append(Kernel(e["name"], grid, float(e["ts"]), float(e["ts"]) + float(e["dur"])))
    return sorted(out, key=lambda k: k.start)


def charges(replay: list[Kernel]) -> list[float]:
    """Each kernel's share of the replay's span (list order = `replay`'s order), summing to it."""
    order = sorted(range(len(replay)), key=lambda i: replay[i].end)
    out = [0.0] * len(replay)
    reached = min(k.start for k in replay)
    for i in order:
        out[i] = max(0.0, replay[i].end - reached)
        reached = max(reached, replay[i].end)
    return out


def attribute(kernels: list[Kernel], replays: int) -> dict:
    """Charges per kernel kind and per position, averaged over `replays` equal runs of kernels."""
    if replays < 1 or not kernels or len(kernels) % replays:
        raise ValueError(f"{len(kernels)} kernels do not split into {replays} equal replays")
    per = len(kernels) // replays
    runs = [kernels[r * per:(r + 1) * per] for r in range(replays)]
    kinds: dict[str, list[float]] = {}  # charge, duration, count (sums over replays)
    positions = [[0.0, 0.0] for _ in range(per)]
    spans = []
    for run in runs:
        spans.append(max(k.end for k in run) - min(k.start for k in run))
        for i, (k, c) in enumerate(zip(run, charges(run))):
            entry = kinds.setdefault(k.kind, [0.0, 0.0, 0])
            entry[0] += c
            entry[1] += k.end - k.start
            entry[2] += 1
            positions[i][0] += c
            positions[i][1] += k.end - k.start
    rows = sorted(({"kind": kind, "charge_us": c / replays, "busy_us": d / replays, "calls": n / replays}
                   for kind, (c, d, n) in kinds.items()), key=lambda r: -r["charge_us"])
    first = runs[0]
    return {"span_us": statistics.median(spans), "kernels_per_replay": per, "kinds": rows,
            "positions": [{"i": i, "kind": first[i].kind, "charge_us": c / replays, "busy_us": d / replays}
                          for i, (c, d) in enumerate(positions)]}


def report(result: dict, top: int = 25) -> list[str]:
    """The table: kinds by charge, with their kernels' busy time beside it."""
    lines = [f"critical path: {result['span_us']:.0f} us a replay, {result['kernels_per_replay']} kernels "
             "(charge = how much each kind moved the replay's end; busy = its kernels' own durations)"]
    for r in result["kinds"][:top]:
        lines.append(f"  {r['charge_us']:8.1f} us charged  {r['busy_us']:8.1f} us busy  "
                     f"x{r['calls']:5.1f}  {r['kind']}")
    return lines


def from_profile(prof, replays: int, path: Path) -> dict:  # noqa: ANN001 - a torch.profiler.profile
    """`attribute` over a finished torch.profiler run of `replays` replays (its trace kept at `path`)."""
    prof.export_chrome_trace(str(path))
    return attribute(kernels_of(json.loads(path.read_text())), replays)
