"""A/B of kernel switches on CLSA's decode step, in one process on one card.

    python bench/decode_ab.py --setting base: \
        --setting evict:kernels.triton_attention.SPARSE_KV_EVICTION=evict_last \
        --setting pre2:kernels.skinny_linear.PRE_WAIT_TILES=2 --rounds 2 --out DIR

Each `--setting NAME:MODULE.ATTR=VALUE[,MODULE.ATTR=VALUE...]` is a set of module-level switches
(the values parsed as Python literals where they are one, else kept as strings);
`MODULE.DICT[KEY]=VALUE` sets one entry of a module's dict, e.g. one weight shape's skinny-GEMM
configuration: `kernels.skinny_linear.SKINNY_CONFIGS[(3072,3072)]=(64,128,264,4,3)`. The model is
built, its projections stacked and its layers compiled once; then, round after round, each
setting in turn is applied, the decode graphs are captured afresh and the step is timed at each
batch (`bench/decode.py`'s `run_variant`, clsa, no breakdown), and the switches are put back.
Interleaving the settings over rounds keeps a drift of the card (clocks, temperature) from
looking like a difference between them. Prints the median over rounds of each setting's step and
its ratio to the first setting's; writes `decode_ab.json` under --out.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import decode as bench_decode  # noqa: E402  (bench/decode.py)
import torch  # noqa: E402

from services.engine.config import preset  # noqa: E402


def _split_top(body: str) -> list[str]:
    """body split at the commas outside brackets ('a=1,b=(2, 3)' -> ['a=1', 'b=(2, 3)'])."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(body):
        depth += (ch in "([{") - (ch in ")]}")
        if ch == "," and depth == 0:
            items.append(body[start:i])
            start = i + 1
    items.append(body[start:])
    return [item for item in items if item]


def _literal(raw: str) -> object:
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw


Switch = tuple[str, str, object, object]  # (module, attribute, key or _WHOLE, value)
_WHOLE = object()  # the switch sets the attribute itself, not one of its items


def parse_setting(text: str) -> tuple[str, list[Switch]]:
    """'name:mod.ATTR=value,mod.DICT[key]=value,...' -> (name, switches); an unknown module or
    attribute, or a key its dict does not hold, is an error here, before any time is spent on
    the card."""
    name, sep, body = text.partition(":")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"setting {text!r}: expected NAME:MODULE.ATTR[KEY]=VALUE[,...]")
    switches: list[Switch] = []
    for item in _split_top(body):
        target, eq, raw = item.partition("=")
        key: object = _WHOLE
        if target.endswith("]") and "[" in target:
            target, _, key_text = target[:-1].partition("[")
            key = _literal(key_text)
        module_name, dot, attr = target.rpartition(".")
        if not eq or not dot:
            raise argparse.ArgumentTypeError(f"setting {name}: {item!r} is not MODULE.ATTR[KEY]=VALUE")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise argparse.ArgumentTypeError(f"setting {name}: no module {module_name!r} ({exc})") from None
        if not hasattr(module, attr):
            raise argparse.ArgumentTypeError(f"setting {name}: {module_name} has no {attr}")
        if key is not _WHOLE:
            table = getattr(module, attr)
            if not isinstance(table, dict):
                raise argparse.ArgumentTypeError(f"setting {name}: {module_name}.{attr} is not a dict")
            if key not in table:
                raise argparse.ArgumentTypeError(f"setting {name}: {module_name}.{attr} has no key {key!r}")
        switches.append((module_name, attr, key, _literal(raw)))
    return name, switches


def apply(switches: list[Switch]) -> list[Switch]:
    """Sets the switches; returns what they were, for `apply` to put back (in reverse order)."""
    before = []
    for module_name, attr, key, value in switches:
        module = importlib.import_module(module_name)
        if key is _WHOLE:
            before.append((module_name, attr, key, getattr(module, attr)))
            setattr(module, attr, value)
        else:
            table = getattr(module, attr)
            before.append((module_name, attr, key, table[key]))
            table[key] = value
    return before[::-1]


def describe(switch: Switch) -> str:
    module_name, attr, key, value = switch
    return f"{module_name}.{attr}{'' if key is _WHOLE else f'[{key!r}]'}={value!r}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setting", action="append", type=parse_setting, required=True,
                   help="NAME:MODULE.ATTR[KEY]=VALUE[,...]; the first is the reference")
    p.add_argument("--n", default="128K")
    p.add_argument("--bs", nargs="+", type=int, default=[1, 7])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--out", default="/tmp/decode_ab")
    p.add_argument("--smoke", action="store_true", help="on the CPU, clsa-tiny shapes, N=200, uncompiled")
    args = p.parse_args()
    names = [name for name, _ in args.setting]
    if len(set(names)) != len(names):
        raise SystemExit(f"setting names must differ: {names}")
    cfg = preset("clsa-4b")
    if args.smoke:
        bench_decode.DEVICE = torch.device("cpu")
        cfg = dataclasses.replace(preset("clsa-tiny"), index_topk=32)
        args.n, args.reps = "200", 2
    elif not torch.cuda.is_available():
        raise SystemExit("decode_ab.py times CUDA graphs: it needs a GPU (or --smoke on the CPU)")
    n = bench_decode.parse_n(args.n)
    model = bench_decode.random_model(cfg)
    model.fuse_projections()
    if not args.smoke:
        model.compile_layers()
    variant = bench_decode.VARIANTS["clsa"]
    times: dict[str, dict[int, list[float]]] = {name: {b: [] for b in args.bs} for name in names}
    # Each setting's logits, from the same weights and the same synthetic context (seeded), against
    # the reference's first round: a setting that changes the answer shows here, beside the noise
    # floor (the reference's later rounds against its first).
    bench_decode.KEEP_LOGITS = True
    first: dict[int, torch.Tensor] = {}
    diffs: dict[str, dict[int, list[float]]] = {name: {b: [] for b in args.bs} for name in names}
    for round_ in range(args.rounds):
        for name, switches in args.setting:
            before = apply(switches)
            try:
                torch.manual_seed(0)  # the same synthetic K/V in every run
                rows = bench_decode.run_variant(variant, model, n, args.bs, args.reps, breakdown=False)
            finally:
                apply(before)
            for row in rows:
                logits = row.pop("logits", None)
                if logits is not None:
                    if row["b"] not in first:
                        first[row["b"]] = logits
                    else:
                        diffs[name][row["b"]].append((logits - first[row["b"]]).abs().max().item())
                if "step_ms" in row:
                    times[name][row["b"]].append(row["step_ms"])
            bench_decode.log(f"round {round_ + 1}/{args.rounds} {name}: "
                             + "  ".join(f"B={r['b']} {r.get('step_ms', float('nan')):.3f} ms" for r in rows))
    device_name = torch.cuda.get_device_name() if bench_decode.DEVICE.type == "cuda" else "cpu"
    lines = [f"decode A/B {time.strftime('%Y-%m-%dT%H:%M:%S')}  {device_name}  N={n}  "
             f"median of {args.rounds} rounds x {args.reps} reps (ms; ratio to {names[0]})",
             f"{'setting':16s}" + "".join(f"{'B=' + str(b):>18s}" for b in args.bs)
             + "   max |logit - reference's first round|"]
    result = {"n": n, "rounds": args.rounds, "reps": args.reps, "settings": {}}
    ref = {b: statistics.median(times[names[0]][b]) if times[names[0]][b] else float("nan") for b in args.bs}
    for name, switches in args.setting:
        med = {b: statistics.median(times[name][b]) if times[name][b] else float("nan") for b in args.bs}
        worst = {b: max(diffs[name][b], default=float("nan")) for b in args.bs}
        lines.append(f"{name:16s}" + "".join(f"{med[b]:10.3f} ({med[b] / ref[b]:.3f})" for b in args.bs)
                     + "   " + "  ".join(f"B={b} {worst[b]:.3g}" for b in args.bs))
        result["settings"][name] = {"switches": [describe(switch) for switch in switches],
                                    "step_ms": {str(b): times[name][b] for b in args.bs},
                                    "median_ms": {str(b): med[b] for b in args.bs},
                                    "max_logit_diff": {str(b): worst[b] for b in args.bs}}
    print("\n".join(lines))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode_ab.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "decode_ab.txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
