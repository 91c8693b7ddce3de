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
#   skinny   the skinny-GEMM work of issue 7: its compiled tests and the CUDA-graph engine tests, the
#            kernel's sweep against cuBLAS (L2 prefetch column included), then the decode step at 128K,
#            B = 1 and 7, for each path: cuBLAS, the kernel without the fused q/k/v, the default, the
#            default + L2 prefetch (~10 min; over two calls: SKINNY_PATHS="..." picks the paths,
#            SKINNY_SWEEP=0 skips the tests and the sweep)
#                                                                           -> skinny/, decode_*/
#   issue7   issue 7's 128K targets in one call: the decode step of every variant at B = 1 and 7 with its
#            breakdown, the one-chunk prefill of the Transformer and CLSA, and CLSA's prefill kernels
#            (--profile) (~6 min cold)                    -> decode/, decode.txt, prefill/, prefill_profile.txt
#   critical CLSA's 128K step at B = 7 and 1 under torch.profiler: its kernels by GPU time and by their
#            share of the step's critical path (bench/critical_path.py) (~2 min cold) -> critical/, critical.txt
#   ring_fresh the switches built on 2026-12-07 with no card to run them: bench/ring_race.py --check (the ring
#            read all before / all after the PDL wait / before but for the token's own row: mismatches and
#            time), the compiled tests of graph_step.RING_FRESH_ROW and L2_NEXT_WEIGHT, then bench/decode_ab.py
#            at 128K, B = 7 and 1: base, fresh, fresh + the next weight asked of L2 (~6 min cold)
#                                                            -> ring_race.json, ring_fresh_tests.txt, decode_ab/
#   switches issue 7's open experiments in one call: the window kernel at 128K before and after its
#            unmasked interior (the old kernels/triton_attention.py from ab_old/, made by
#            `bash bench/gpu_session.sh ab-prepare REV kernels/triton_attention.py`, carried), then
#            bench/decode_ab.py over the skinny GEMM's pre-wait tiles and the L2 eviction policies
#            ($AB_SETTINGS overrides the list), then CLSA's one-chunk prefill (~8 min cold)
#                                          -> window_old/, window_new/, decode_ab/, prefill_clsa/ (+ .txt)
#   decode_ab  bench/decode_ab.py over $AB_SETTINGS (CLSA's 128K step at B = $AB_BS, "1 7"; $AB_ROUNDS
#            rounds, 3; $AB_TIMEOUT s at most, 330) (~4 min cold)        -> decode_ab/, decode_ab.txt
#   winners  after decode_ab: issue 7's decode table (every variant, 128K, B = 1 and 7, as in issue7) with
#            the switches of decode_ab's winners at B = 7 set (bench/ab_winners.py; none: the defaults)
#            (~4 min)                                                              -> decode/, decode.txt
#   window   the window kernel's compiled tests, then bench/window_attention.py at 128K, default
#            configuration: grid orders x RoPE inside or not (~2 min)             -> window/, window.txt
#   prefill  bench/prefill.py at 128K over $PREFILL_VARIANTS (transformer clsa), $PREFILL_REPS (3) runs
#                                                                                 -> prefill/, prefill.txt
#   prefill_ab bench/prefill.py at 128K over $PREFILL_SETTINGS, interleaved run by run ($PREFILL_VARIANTS:
#            transformer clsa; $PREFILL_REPS: 5; ~4 min cold)                    -> prefill_ab/, prefill_ab.txt
#   ab       an A/B of two versions of the kernels on one machine (~20 s a round): the files under
#            ab_old/ (made on the CPU by `bash bench/gpu_session.sh ab-prepare REV FILE...`, carried
#            with `carry: ["ab_old"]`: it is git-ignored) stand in for their namesakes in the "old"
#            rounds; old, new, old, new, each `sweep_kernels.py --tune --topk-defaults $AB_ARGS`;
#            the new files are back in place afterwards                             -> ab_old/, ab_new/
#            (machines differ by up to 4 us at index_topk B=32: compare versions within one call)
# The sm_90 compile report needs no GPU: `python bench/compile_report.py` on the CPU.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_session}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
if [ "${1:-}" = ab-prepare ]; then  # on the CPU: ab_old/<path> = <path> at git revision REV
    rev=${2:?usage: gpu_session.sh ab-prepare REV FILE...}; shift 2
    rm -rf ab_old
    for f in "$@"; do mkdir -p "ab_old/$(dirname "$f")"; git show "$rev:$f" > "ab_old/$f" || exit 1; done
    echo "ab_old/ holds $* at $rev"; exit 0
fi
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
    skinny)
        if [ "${SKINNY_SWEEP:-1}" != 0 ]; then
            TRITON_INTERPRET=0 timeout 200 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_skinny_linear.py \
                tests/engine/test_graph_step.py -k "skinny or split or qkv or cuda" > "$OUT/skinny_tests.txt" 2>&1
            grep -E "passed|failed|^FAILED|^ERROR" "$OUT/skinny_tests.txt" | head -12
            timeout 330 python3 bench/skinny_gemm.py --out "$OUT/skinny" 2>&1 | grep -v -i warn | tail -45
        fi
        for path in ${SKINNY_PATHS:-no-skinny no-fused-qkv default skinny-prefetch}; do
            case $path in
            no-skinny) flags=(--no-skinny) ;; no-fused-qkv) flags=(--no-fused-qkv) ;; default) flags=() ;;
            skinny-prefetch) flags=(--skinny-prefetch) ;;
            esac
            timeout 120 python3 bench/decode.py --ns 128K --bs 1 7 --variants clsa --compile --fuse --no-breakdown \
                --reps 10 "${flags[@]}" --out "$OUT/decode_$path" > "$OUT/decode_$path.txt" 2>&1
            echo "-- $path (rc $?)"; grep -E "^ 131072 " "$OUT/decode_$path.txt" | head -2
        done
        ;;
    issue7)
        timeout 240 python3 bench/decode.py --ns 128K --bs 1 7 --compile --fuse --reps 10 --out "$OUT/decode" \
            > "$OUT/decode.txt" 2>&1
        echo "decode rc $?"; grep -E "^ 131072 " "$OUT/decode.txt"
        timeout 180 python3 bench/prefill.py --compile --ns 128K --variants transformer clsa --out "$OUT/prefill" \
            > "$OUT/prefill.txt" 2>&1
        echo "prefill rc $?"; tail -3 "$OUT/prefill.txt"
        timeout 90 python3 bench/prefill.py --compile --ns 128K --variants clsa --profile --reps 1 --out /tmp/pp \
            > "$OUT/prefill_profile.txt" 2>&1
        echo "prefill profile rc $?"; grep -A26 "kernels:" "$OUT/prefill_profile.txt" | cut -c1-130
        ;;
    critical)
        timeout 150 python3 bench/decode.py --ns 128K --bs 7 1 --variants clsa --compile --fuse --no-breakdown \
            --profile --reps 10 --out "$OUT/critical" > "$OUT/critical.txt" 2>&1
        echo "critical rc $?"; grep -A26 "critical path" "$OUT/critical.txt" | cut -c18-150
        ;;
    ring_fresh)
        timeout 90 python3 bench/ring_race.py --check --replays 30 --out "$OUT" 2>&1 | tail -8
        TRITON_INTERPRET=0 timeout 200 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_triton.py \
            tests/engine/test_graph_step.py -k "fresh or l2_for_the_next or cuda_graph_replay" \
            > "$OUT/ring_fresh_tests.txt" 2>&1
        grep -E "passed|failed|^FAILED|^ERROR" "$OUT/ring_fresh_tests.txt" | head -8
        GS=services.engine.graph_step
        timeout 300 python3 bench/decode_ab.py --setting "base:" --setting "fresh:$GS.RING_FRESH_ROW=True" \
            --setting "fresh_l2:$GS.RING_FRESH_ROW=True,$GS.L2_NEXT_WEIGHT=True" --rounds 2 --bs 7 1 \
            --out "$OUT/decode_ab" > "$OUT/decode_ab.txt" 2>&1
        echo "decode A/B rc $?"; grep -v "^\[decode" "$OUT/decode_ab.txt" | tail -6
        ;;
    switches)
        if [ -f ab_old/kernels/triton_attention.py ]; then
            cp kernels/triton_attention.py /tmp/triton_attention.new.py
            cp ab_old/kernels/triton_attention.py kernels/triton_attention.py
            timeout 100 python3 bench/window_attention.py --ts 131072 --out "$OUT/window_old" > "$OUT/window_old.txt" 2>&1
            echo "window (old kernel) rc $?"; cut -c1-110 "$OUT/window_old.txt"
            cp /tmp/triton_attention.new.py kernels/triton_attention.py
        fi
        timeout 100 python3 bench/window_attention.py --ts 131072 --out "$OUT/window_new" > "$OUT/window_new.txt" 2>&1
        echo "window rc $?"; cut -c1-110 "$OUT/window_new.txt"
        SL=kernels.skinny_linear TA=kernels.triton_attention
        settings=${AB_SETTINGS:-"base: pre2:$SL.PRE_WAIT_TILES=2 pre3:$SL.PRE_WAIT_TILES=3
            kv_last:$TA.SPARSE_KV_EVICTION=evict_last
            kv_last_ring_first:$TA.SPARSE_KV_EVICTION=evict_last,$TA.DENSE_KV_EVICTION=evict_first
            w_first_kv_last:$SL.WEIGHT_EVICTION=evict_first,$TA.SPARSE_KV_EVICTION=evict_last"}
        args=(); for s in $settings; do args+=(--setting "$s"); done
        timeout 330 python3 bench/decode_ab.py "${args[@]}" --rounds 2 --out "$OUT/decode_ab" > "$OUT/decode_ab.txt" 2>&1
        echo "decode A/B rc $?"; grep -v "^\[decode" "$OUT/decode_ab.txt" | tail -12; grep -E "Error|error" "$OUT/decode_ab.txt" | head -5
        timeout 150 python3 bench/prefill.py --compile --ns 128K --variants clsa --out "$OUT/prefill_clsa" \
            > "$OUT/prefill_clsa.txt" 2>&1
        echo "prefill rc $?"; tail -4 "$OUT/prefill_clsa.txt"
        ;;
    winners)
        w=$(python3 bench/ab_winners.py "$OUT/decode_ab/decode_ab.json" --b 7)
        timeout "${WINNERS_TIMEOUT:-290}" python3 bench/decode.py --ns 128K --bs 1 7 --compile --fuse --reps 10 \
            ${w:+--switches "$w"} --out "$OUT/decode" > "$OUT/decode.txt" 2>&1
        echo "decode rc $? (switches: ${w:-none})"; grep -E "^ 131072 " "$OUT/decode.txt"
        ;;
    decode_ab)
        args=(); for s in ${AB_SETTINGS:?decode_ab: set AB_SETTINGS, e.g. "base: pre2:kernels.skinny_linear.PRE_WAIT_TILES=2"}; do
            args+=(--setting "$s"); done
        # shellcheck disable=SC2086  # AB_BS: batch sizes, word-split on purpose
        timeout "${AB_TIMEOUT:-330}" python3 bench/decode_ab.py "${args[@]}" --rounds "${AB_ROUNDS:-3}" \
            --bs ${AB_BS:-1 7} --out "$OUT/decode_ab" \
            > "$OUT/decode_ab.txt" 2>&1
        echo "decode A/B rc $?"; grep -v "^\[decode" "$OUT/decode_ab.txt" | tail -12; grep -E "Error|error" "$OUT/decode_ab.txt" | head -5
        ;;
    window)
        TRITON_INTERPRET=0 timeout 200 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_triton.py -k window \
            > "$OUT/window_tests.txt" 2>&1
        echo "window tests: $(tail -1 "$OUT/window_tests.txt")"; grep -E "^(FAILED|ERROR)" "$OUT/window_tests.txt" | head
        timeout 100 python3 bench/window_attention.py --ts 131072 --no-sweep --out "$OUT/window" > "$OUT/window.txt" 2>&1
        echo "window bench rc $?"; cut -c1-120 "$OUT/window.txt"
        ;;
    prefill)
        timeout 300 python3 bench/prefill.py --compile --ns 128K --variants ${PREFILL_VARIANTS:-transformer clsa} \
            --reps "${PREFILL_REPS:-3}" --out "$OUT/prefill" > "$OUT/prefill.txt" 2>&1
        echo "prefill rc $?"; grep -E "runs:|^ +131072" "$OUT/prefill.txt" | cut -c1-160
        ;;
    prefill_ab)
        args=(); for s in ${PREFILL_SETTINGS:?prefill_ab: set PREFILL_SETTINGS, e.g. "base: add:services.engine.layers.RESIDUAL_GEMM=False"}; do
            args+=(--setting "$s"); done
        timeout 330 python3 bench/prefill.py --compile --ns 128K --variants ${PREFILL_VARIANTS:-transformer clsa} \
            --reps "${PREFILL_REPS:-5}" "${args[@]}" --out "$OUT/prefill_ab" > "$OUT/prefill_ab.txt" 2>&1
        echo "prefill A/B rc $?"; grep -E "runs:|^ +131072" "$OUT/prefill_ab.txt" | cut -c1-160
        grep -E "Error|error" "$OUT/prefill_ab.txt" | head -5
        ;;
    ab)
        [ -d ab_old ] || { echo "ab: no ab_old/ (run ab-prepare on the CPU, carry it)"; continue; }
        files=$(cd ab_old && find . -type f -name '*.py' | sed 's|^\./||')
        mkdir -p /tmp/ab_new
        for f in $files; do mkdir -p "/tmp/ab_new/$(dirname "$f")"; cp "$f" "/tmp/ab_new/$f"; done
        for round in old new old new; do
            src=$([ $round = old ] && echo ab_old || echo /tmp/ab_new)
            for f in $files; do cp "$src/$f" "$f"; done
            echo "-- $round: $(echo $files)"
            timeout 120 python3 bench/sweep_kernels.py --tune --topk-defaults --out "$OUT/ab_$round" --no-stages \
                ${AB_ARGS:---batches 0 --cases 131072:32,131072:8,131072:1} 2>&1 | grep -E "^(topk|sparse) |fail|Error"
        done
        for f in $files; do cp "/tmp/ab_new/$f" "$f"; done
        ;;
    *)
        echo "unknown step $step"
        ;;
    esac
done
