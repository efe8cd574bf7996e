#!/usr/bin/env bash
# GPU job of the MoE token-dispatch area (issue 7), one H200, at most ~280 s wall clock including Triton compiles:
#   1. the GPU tests of permute / unpermute / moe_ffn (bf16 against float64, no host sync in moe_ffn fwd+bwd);
#   2. bench/moe.py --sections sweep: permute, unpermute and both backwards at the anchor shapes (16384 tokens,
#      E=128 and 64, top-8, H=2048) and the training shape (8192 tokens, E=128): the default tunables and every
#      config of bench/moe.py SWEEP, each checked in bf16 against float64 before it is timed, with torch
#      (argsort + gather, gather-mul-sum, index_add, torch autograd) side by side;
#   3. bench/moe.py --sections profile: torch.profiler of one SparseMoeBlock forward + backward at the training shape.
# Run from the repo root with the project installed; $OUT gets moe_job.log (everything) and moe.jsonl (results).
# stdout ends with the compact summary (the SUMMARY lines of the bench).
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export VEOFAST_BENCH_RESULTS="$OUT" PYTHONUNBUFFERED=1
LOG="$OUT/moe_job.log"
: > "$LOG"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,memory.used --format=csv,noheader 2>&1 | tee -a "$LOG"

step() {  # step <time limit s> <name> <command...>: runs it under timeout, output to the log, prints its status
  local limit=$1 name=$2 t0
  shift 2
  t0=$(date +%s)
  echo "=== $name: $*" >> "$LOG"
  timeout --kill-after=5 "$limit" "$@" >> "$LOG" 2>&1
  local rc=$?
  echo "STEP $name rc=$rc ($(( $(date +%s) - t0 )) s)$([ $rc -ge 124 ] && echo ' TIMED OUT or killed')"
}

step 50 gpu-tests python3 -m pytest -q -m gpu tests/ops/test_moe.py -p no:cacheprovider \
  -k "permute or unpermute or host_sync or moe_ffn_bf16"
sed -n '/^=== gpu-tests/,/^=== /p' "$LOG" | grep -E "^(FAILED|ERROR)|passed|failed|skipped|error" | head -12
step 175 sweep python3 bench/moe.py --sections sweep --budget-s 100 --repeats 20
step 50 profile python3 bench/moe.py --sections profile
echo "--- summary (full log: moe_job.log)"
grep '^SUMMARY' "$LOG" | sed 's/^SUMMARY //' | cut -c1-200
grep -E "Error|error:" "$LOG" | grep -v "^SUMMARY" | sort | uniq -c | sort -rn | head -5
