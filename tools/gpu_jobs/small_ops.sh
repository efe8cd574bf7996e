#!/usr/bin/env bash
# GPU job of the small fused ops (RMSNorm with/without the residual add, RoPE, SwiGLU) on one H200, < 300 s wall
# clock including Triton and torch.compile compilation:
#   1. sweep: every candidate config of each veofast kernel (forward and backward launchers) at the bench shapes
#      and the Llama-3.2-1B / Qwen3-30B-A3B training shapes; each config is checked in bf16 against a float64
#      reference (outputs and gradients) before it is timed. One process per op: a config that crashes the CUDA
#      context loses only that op's remaining configs.
#   2. providers: veofast (pinned configs) side by side with torch eager, torch.compile and liger-kernel (when
#      importable), forward and forward+backward, errors against float64.
#   3. a compact summary on stdout: the config to pin per CONFIGS entry, the provider table, then per kernel and
#      shape the pinned vs the best config.
# Run from the repo root, veofast installed. $OUT gets small_ops.jsonl (all measurements) and small_ops.log.
# SMALL_OPS_SMOKE=1 runs the same steps on CPU (Triton interpreter, tiny shapes) to check the script itself.
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export VEOFAST_BENCH_RESULTS="$OUT" PYTHONUNBUFFERED=1
LOG="$OUT/small_ops.log"
T0=$(date +%s)
DEADLINE=$((T0 + 280))
STEP_OUT=$(mktemp)
if [ "${SMALL_OPS_SMOKE:-0}" = 1 ]; then
  export TRITON_INTERPRET=1
  MODE=(--smoke --compile-backend aot_eager)
else
  MODE=(--shapes bench,train)
  python3 -c "import liger_kernel" 2>/dev/null || { [ -d /tmp/site ] && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"; }
  python3 -c "import liger_kernel" 2>/dev/null && echo "liger-kernel importable" || echo "liger-kernel NOT importable"
  nvidia-smi -i "${CUDA_VISIBLE_DEVICES:-0}" --query-gpu=name,clocks.sm,clocks.max.sm,clocks.mem,memory.used \
    --format=csv,noheader | tee -a "$LOG"
fi

# step CAP ARGS...: one bench process under min(CAP, time left) seconds; its output is appended to the log.
step() {
  local cap=$1 left rc
  shift
  left=$((DEADLINE - $(date +%s)))
  ((left < cap)) && cap=$left
  if ((cap < 10)); then
    echo "skipped, no time left: $*" | tee -a "$LOG"
    return
  fi
  timeout "$cap" python3 bench/small_ops.py "${MODE[@]}" "$@" > "$STEP_OUT" 2>&1
  rc=$?
  { echo "=== bench/small_ops.py ${MODE[*]} $* (limit ${cap} s): rc=$rc"; cat "$STEP_OUT"; } >> "$LOG"
  echo "[$(($(date +%s) - T0)) s] rc=$rc: $*"
  ((rc != 0)) && grep -E "Error|error|Killed" "$STEP_OUT" | tail -3
}

step 75 --sections sweep --ops rms_norm --repeats 8
step 70 --sections sweep --ops rope --repeats 8
step 35 --sections sweep --ops swiglu --repeats 8
step 200 --sections providers --quick
rm -f "$STEP_OUT"
python3 bench/small_ops.py --summarize "$OUT/small_ops.jsonl" | cut -c1-300 | head -c 3300
echo
echo "[$(($(date +%s) - T0)) s] done; full log in small_ops.log"
