#!/usr/bin/env bash
# The kernel issue's device calls, each one `run` of the device tool (10 minutes at most): pick
# the steps, in order. Everything lands under $OUT (or /tmp/gpu_session off the device tool).
#
#   bash bench/gpu_session.sh tests tune profile     compiled kernel tests, the tuning sweep, counters
#   bash bench/gpu_session.sh tests bench            compiled kernel tests, then the benchmark
#
# Steps (rough times on an H200):
#   tests    tests/kernels/test_triton.py compiled (bf16 included), four pytest processes at once
#            (compilation is most of it; ~3 min)                                 -> tests.txt
#   wide     bench/sweep_kernels.py --wide: the wide sparse kernel vs per-head (~3 min) -> sparse_wide.json
#   tune     bench/sweep_kernels.py --tune $TUNE_ARGS: index_topk prefetch and shapes with time per phase,
#            sparse merge / splits / PDL / wide shapes (~4 min)                  -> tune.json, tune.txt
#   profile  Nsight Compute counters of index_topk and one sparse layer at B = 1, 8 (~1 min) -> ncu.txt
#   bench    bench/kernels.py, with --wide-from $OUT/sparse_wide.json when the wide step ran (~1 min)
# The sm_90 compile report needs no GPU: `python bench/compile_report.py` on the CPU.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_session}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
[ $# -gt 0 ] || set -- tests wide bench
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
for step in "$@"; do
    echo "== $step ($(date +%T))"
    case $step in
    tests)
        parts=("topk" "sparse_decode_attention and not wide" "wide" "not topk and not sparse_decode_attention and not wide")
        for i in "${!parts[@]}"; do
            TRITON_INTERPRET=0 timeout 300 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_triton.py \
                -k "${parts[$i]}" > "$OUT/tests_$i.log" 2>&1 &
        done
        wait
        for i in "${!parts[@]}"; do echo "[${parts[$i]}] $(tail -1 "$OUT/tests_$i.log")"; done | tee "$OUT/tests.txt"
        grep -h -E "^(FAILED|ERROR)" "$OUT"/tests_*.log | head -20 | tee -a "$OUT/tests.txt"
        rm -f "$OUT"/tests_*.log
        ;;
    wide)
        timeout 230 python3 bench/sweep_kernels.py --wide --out "$OUT" 2>&1 | tail -40
        ;;
    tune)
        timeout 300 python3 bench/sweep_kernels.py --tune --out "$OUT" ${TUNE_ARGS:-} 2>&1 | tee "$OUT/tune.txt" | grep -v "^{"
        ;;
    profile)
        ncu=$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
        [ -n "$ncu" ] || { echo "no ncu here"; continue; }
        timeout 150 "$ncu" --profile-from-start off --clock-control none --section SpeedOfLight \
            --section MemoryWorkloadAnalysis --section Occupancy --section WarpStateStats --section LaunchStats \
            python3 bench/profile_kernels.py --batches 1,8 > "$OUT/ncu.txt" 2>&1
        echo "ncu rc=$? ($(wc -l < "$OUT/ncu.txt") lines)"
        grep -E "^  [a-z_]+.*\(|Duration|DRAM Throughput|Memory Throughput|Achieved Occupancy|Registers Per" \
            "$OUT/ncu.txt" | head -60
        ;;
    bench)
        args=()
        [ -s "$OUT/sparse_wide.json" ] && args=(--wide-from "$OUT/sparse_wide.json")
        timeout 200 python3 bench/kernels.py --out "$OUT" "${args[@]}" 2>&1 | tail -60
        ;;
    *)
        echo "unknown step $step"
        ;;
    esac
done
