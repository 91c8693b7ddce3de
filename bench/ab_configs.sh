#!/usr/bin/env bash
# One device call: A/B of the sparse and ring attention kernels' launch settings in CLSA's decode
# step at 128K, B = 7 (bench/decode_ab.py; results under $OUT/ab).
set -u
D=kernels.decode_attention
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
export PYTHONUNBUFFERED=1
timeout 560 python3 bench/decode_ab.py --bs 7 --rounds 2 --out "$OUT/ab" \
  --setting base: \
  --setting "sp_st2:$D.SPARSE_SMALL_CONFIG=(64,4,2,True)" \
  --setting "sp_w6:$D.SPARSE_SMALL_WAVES=6" \
  --setting "sp_w6_st2:$D.SPARSE_SMALL_CONFIG=(64,4,2,True),$D.SPARSE_SMALL_WAVES=6" \
  --setting "sp_bn32_w6:$D.SPARSE_SMALL_CONFIG=(32,4,2,True),$D.SPARSE_SMALL_WAVES=6" \
  --setting "wide7:$D.WIDE_MIN_BATCH=7" \
  --setting "ring_bn64:$D.DENSE_CONFIG=(64,4,3,False)" \
  2>&1 | grep -v -i warn | tail -40
