"""The kernels as an H200 would run them: compiled for sm_90 on this CPU (no GPU needed).

The interpreter checks what the kernels compute; this checks what ptxas makes of the launch
configurations the launchers pick on the card - that each compiles, spills no registers, and fits
the programs per SM its grid was planned for. A subprocess: the rest of the suite runs Triton's
interpreter, which replaces every kernel when Triton is first imported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_default_launch_configurations_compile_for_sm90_without_spills(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    report = tmp_path / "compile.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "compile_report.py"), "--check", "--json",
                           str(report)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads(report.read_text())
    defaults = [r for r in rows if r["default"]]
    kernels = {(r["op"], r["kernel"]) for r in defaults}
    assert {("index_topk", "_topk_kernel"), ("sparse", "_decode_partial_kernel"), ("sparse", "_merge_splits_kernel"),
            ("dense", "_decode_partial_kernel"), ("rows", "_positions_to_rows_kernel"),
            ("skinny", "_skinny_gemm_kernel")} <= kernels
    for r in defaults:
        assert r["spill_bytes"] == 0, r
    # The cooperative top-k needs every program of its grid resident at once: 4 per SM on 132 SMs.
    for r in defaults:
        if r["op"] == "index_topk":
            assert r["programs_per_sm"] >= 4 and r["grid"][0] * r["grid"][1] <= 4 * 132, r
    # Every wide-kernel variant the GPU sweep times compiles, and without spills.
    wide = [r for r in rows if r["kernel"] == "_sparse_wide_partial_kernel"]
    assert wide and all(r["spill_bytes"] == 0 for r in wide), [r for r in wide if r["spill_bytes"]]
    # The per-head sparse kernel's load-order switches (rows or K/V a block ahead, the L2 prefetch's
    # inline PTX) compile without spills at the small batch they are meant for.
    switched = [r for r in rows if r["op"] == "sparse" and r["variant"].startswith("per-head ")]
    assert len(switched) >= 4 and all(r["spill_bytes"] == 0 for r in switched), switched
    # So does the copy of the selected rows that a gathering plan makes.
    gathers = [r for r in rows if r["op"] == "gather"]
    assert gathers and all(r["spill_bytes"] == 0 for r in gathers), gathers
    # The skinny GEMM of every clsa-4b projection, its L2 prefetch (inline PTX), its 2 and 3 weight
    # tiles before the PDL wait, and their x tiles loaded together after it (with and without the
    # next tiles asked of L2 then) included, compiles without spills and keeps its weight loads
    # asynchronous (the pipeliner's cp.async).
    skinny = [r for r in rows if r["op"] in ("skinny", "skinny_qkv")]
    assert len(skinny) == 2 * (7 * 5 + 1) and all(r["spill_bytes"] == 0 and r["async_copies"] > 0 for r in skinny), \
        skinny
