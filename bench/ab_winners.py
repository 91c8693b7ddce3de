"""The switches of an A/B's winners at one batch, for `bench/decode.py --switches`:

    python bench/ab_winners.py DIR/decode_ab.json --b 7 [--margin 0.003]

Every setting whose median step beats the first setting's (the reference) by more than `margin`
(a fraction) is a candidate. The fastest candidate wins; each other candidate that sets none of
the winner's switches joins it in order of speed (switches of different kernels: a combination the
A/B did not time, so rerun one to check it). Prints the joined switches (nothing when no setting
wins) and, on stderr, which settings they came from.
"""

from __future__ import annotations

import argparse
import json
import sys


def winners(result: dict, b: str, margin: float) -> list[str]:
    settings = result["settings"]
    names = list(settings)
    ref = settings[names[0]]["median_ms"][b]
    ranked = sorted((s["median_ms"][b], name) for name, s in settings.items() if name != names[0])
    chosen: list[str] = []
    taken: set[str] = set()
    for ms, name in ranked:
        if ms >= ref * (1 - margin):
            break
        targets = {switch.partition("=")[0] for switch in settings[name]["switches"]}
        if targets & taken:
            continue
        chosen.append(name)
        taken |= targets
    return chosen


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("result")
    p.add_argument("--b", default="7")
    p.add_argument("--margin", type=float, default=0.003)
    args = p.parse_args()
    with open(args.result) as f:
        result = json.load(f)
    names = winners(result, args.b, args.margin)
    print(",".join(switch for name in names for switch in result["settings"][name]["switches"]))
    print(f"winners at B={args.b}: {names or 'none'}", file=sys.stderr)


if __name__ == "__main__":
    main()
