#!/usr/bin/env bash
# GPU job of Ulysses (issue 8) on 2 GPUs: bench/ulysses.py --quick under caps on the CTAs (SMs) that each NCCL
# kernel may occupy (NCCL_MAX_CTAS; "default" leaves NCCL's choice). The question: does the overlapped all-to-all
# hide once it takes fewer SMs from the GEMMs that run beside it? Prints each run's timing table and summary.
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
for ctas in ${ULYSSES_CTAS:-default 2 8}; do
  echo "=== NCCL_MAX_CTAS=$ctas"
  ( [ "$ctas" != default ] && export NCCL_MAX_CTAS=$ctas NCCL_MIN_CTAS=1
    timeout 150 torchrun --nproc_per_node=2 --master_port=29681 bench/ulysses.py --quick ) > "$OUT/ctas_$ctas.log" 2>&1
  echo "rc=$?"
  grep -E "^(overlap|sync|compute|comm|1gpu|1gpu_half) |^(hidden%|eff|eff_half|trace_hidden%|trace_nccl_ms):" \
    "$OUT/ctas_$ctas.log"
done
