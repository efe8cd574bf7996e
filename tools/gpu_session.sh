#!/usr/bin/env bash
# One batched GPU session: install veofast, run the GPU-marked tests, then the benchmark suites named on the
# command line (default: the op suites), each under a time limit. One log ($OUT/session.log) and one JSON-lines
# file per suite go to $OUT (or ./gpu_out): the device tool brings back at most 8 files. Usage: bash tools/gpu_session.sh [tests] [cross_entropy] [attention] [moe] [small_ops] [optimizer] [train]
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export VEOFAST_BENCH_RESULTS="$OUT" PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
LOG="$OUT/session.log"
python3 -m pip install -q --no-build-isolation --no-deps -e . >> "$LOG" 2>&1 || { tail -20 "$LOG"; exit 1; }
nvidia-smi --query-gpu=name,memory.used,clocks.sm --format=csv,noheader
suites=("$@")
[ ${#suites[@]} -eq 0 ] && suites=(tests cross_entropy attention moe small_ops)
for suite in "${suites[@]}"; do
  start=$(date +%s)
  case "$suite" in
    tests) echo "=== gpu tests" >> "$LOG"
           timeout 300 python3 -m pytest -q -m gpu tests -p no:cacheprovider > /tmp/gpu_tests.log 2>&1
           echo "gpu tests rc=$?"; cat /tmp/gpu_tests.log >> "$LOG"; tail -3 /tmp/gpu_tests.log
           grep -E "^(FAILED|ERROR)" /tmp/gpu_tests.log | head -30 ;;
    loss_curve)  # the embedded default on one GPU, 200 steps, all fast paths vs the torch references
      for backend in auto torch; do
        timeout 200 torchrun --nproc_per_node=1 tasks/train.py configs/moe.yaml --train.max_steps 200 \
          --train.save_steps 0 --train.eval_steps 100 --model.ops_backend $backend \
          --train.output_dir /tmp/lc_$backend >> "$LOG" 2>&1; echo "loss_curve $backend rc=$?"
        tail -1 /tmp/lc_$backend/metrics.jsonl
      done
      python3 tools/compare_loss_curves.py /tmp/lc_auto/metrics.jsonl /tmp/lc_torch/metrics.jsonl \
        --label "configs/moe.yaml 1 GPU: triton vs torch references" ;;
    train) echo "=== bench train" >> "$LOG"
       timeout 420 python3 bench/train.py --quick > /tmp/bench.log 2>&1; echo "train rc=$?"
       cat /tmp/bench.log >> "$LOG"; tail -30 /tmp/bench.log ;;
    *) echo "=== bench $suite" >> "$LOG"
       timeout "${SUITE_TIMEOUT:-240}" python3 "bench/$suite.py" --quick > /tmp/bench.log 2>&1; echo "$suite rc=$?"
       cat /tmp/bench.log >> "$LOG"; tail -25 /tmp/bench.log ;;
  esac
  echo "== $suite took $(( $(date +%s) - start )) s"
done
