#!/usr/bin/env bash
# One device call for the kernel issue (at most ~9.5 minutes on an H200, inside the device tool's
# 10-minute limit): the wide sparse kernel's sweep against the per-head one, the benchmark with the
# wide kernel wherever the sweep found it faster, then the compiled kernel tests (bf16 included)
# with the time left. Everything lands under $OUT. The sm_90 compile report needs no GPU: run
# `python bench/compile_report.py` on the CPU.
#
#   device: bash bench/gpu_session.sh      (OUT set by the device tool; else OUT=/tmp/gpu_session)
set -uo pipefail
OUT=${OUT:-/tmp/gpu_session}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
echo "== wide sparse kernel sweep"
timeout 230 python3 bench/sweep_kernels.py --wide --out "$OUT" 2>&1 | tail -40 | tee "$OUT/sweep_wide.txt"
echo "== benchmark"
args=()
[ -s "$OUT/sparse_wide.json" ] && args=(--wide-from "$OUT/sparse_wide.json")
timeout 200 python3 bench/kernels.py --out "$OUT" "${args[@]}" 2>&1 | tail -60
echo "== compiled kernel tests"
TRITON_INTERPRET=0 timeout 140 python3 -m pytest -q -x tests/kernels/test_triton.py 2>&1 | tail -4 | tee "$OUT/tests.txt"
