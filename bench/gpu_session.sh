#!/usr/bin/env bash
# One device call for the kernel issue (about 6-8 minutes on an H200): the compiled kernel tests
# (bf16 included), the wide sparse kernel's sweep against the per-head one, then the benchmark
# with the wide kernel wherever the sweep found it faster. Everything lands under $OUT.
#
#   device: bash bench/gpu_session.sh      (OUT set by the device tool; else OUT=/tmp/gpu_session)
set -uo pipefail
OUT=${OUT:-/tmp/gpu_session}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python3 bench/compile_report.py --json "$OUT/compile.json" > "$OUT/compile.txt" 2>&1 || true
echo "== compiled kernel tests"
TRITON_INTERPRET=0 timeout 240 python3 -m pytest -q -x tests/kernels/test_triton.py 2>&1 | tail -4 | tee "$OUT/tests.txt"
echo "== wide sparse kernel sweep"
timeout 240 python3 bench/sweep_kernels.py --wide --out "$OUT" 2>&1 | tail -40 | tee "$OUT/sweep_wide.txt"
echo "== benchmark"
args=()
[ -s "$OUT/sparse_wide.json" ] && args=(--wide-from "$OUT/sparse_wide.json")
timeout 200 python3 bench/kernels.py --out "$OUT" "${args[@]}" 2>&1 | tail -60
