"""bench/critical_path.py: the step's time charged to the kernels that made it, under overlap."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from critical_path import Kernel, attribute, charges, kernels_of, report  # noqa: E402


def _k(name: str, start: float, end: float, grid: tuple[int, ...] = (1,)) -> Kernel:
    return Kernel(name, grid, start, end)


def test_overlapping_kernels_are_charged_only_what_they_add_and_the_charges_sum_to_the_span() -> None:
    # a GEMM, then an attention kernel launched early (PDL) that waits inside it, then a short one
    replay = [_k("gemm", 0, 10), _k("attn", 2, 14), _k("tiny", 14, 15)]
    assert charges(replay) == [10, 4, 1]
    # the order is the order the kernels end in: one that ends first is charged from the start
    assert charges([_k("a", 0, 9), _k("b", 1, 5)]) == [4, 5]
    # a gap before a kernel is charged to it (it is what the replay waited for)
    assert charges([_k("a", 0, 3), _k("b", 5, 6)]) == [3, 3]


def test_replays_are_averaged_by_kind_and_by_position() -> None:
    run = [_k("gemm", 0, 10, (132,)), _k("attn", 2, 14, (56, 8)), _k("gemm", 14, 20, (132,))]
    second = [_k("gemm", 100, 110, (132,)), _k("attn", 102, 118, (56, 8)), _k("gemm", 118, 126, (132,))]
    result = attribute(run + second, replays=2)
    kinds = {r["kind"]: r for r in result["kinds"]}
    assert kinds["gemm grid=132"]["calls"] == 2 and kinds["attn grid=56x8"]["calls"] == 1
    assert kinds["gemm grid=132"]["charge_us"] == pytest.approx((10 + 6 + 10 + 8) / 2)
    assert kinds["attn grid=56x8"]["charge_us"] == pytest.approx((4 + 8) / 2)
    assert sum(r["charge_us"] for r in result["kinds"]) == pytest.approx((20 + 26) / 2) == result["span_us"]
    assert [p["kind"] for p in result["positions"]] == ["gemm grid=132", "attn grid=56x8", "gemm grid=132"]
    assert "attn grid=56x8" in "\n".join(report(result))
    with pytest.raises(ValueError, match="equal replays"):
        attribute(run + second[:2], replays=2)


def test_a_chrome_trace_gives_its_kernels_not_its_other_events() -> None:
    trace = {"traceEvents": [
        {"ph": "X", "cat": "kernel", "name": "_skinny_kernel", "ts": 5.0, "dur": 2.5, "args": {"grid": [144, 1, 1]}},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaGraphLaunch", "ts": 1.0, "dur": 3.0},
        {"ph": "X", "cat": "kernel", "name": "void at::native::reduce<float>(...)", "ts": 1.0, "dur": 1.0,
         "args": {}},
    ]}
    found = kernels_of(trace)
    assert [k.kind for k in found] == ["void at::native::reduce grid=", "_skinny_kernel grid=144x1x1"]
    assert found[1].end == 7.5
