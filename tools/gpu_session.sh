#!/usr/bin/env bash
# One batched GPU session: install veofast, run the GPU-marked tests, then the benchmark suites named on the
# command line (default: the op suites), each under a time limit. One log ($OUT/session.log) and one JSON-lines
# file per suite go to $OUT (or ./gpu_out): the device tool brings back at most 8 files. Usage: bash tools/gpu_session.sh [tests] [cross_entropy] [attention] [moe] [small_ops] [train]
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
           timeout 300 python3 -m pytest -q -m gpu tests/ops -p no:cacheprovider > /tmp/gpu_tests.log 2>&1
           echo "gpu tests rc=$?"; cat /tmp/gpu_tests.log >> "$LOG"; tail -3 /tmp/gpu_tests.log
           grep -E "^(FAILED|ERROR)" /tmp/gpu_tests.log | head -30 ;;
    *) echo "=== bench $suite" >> "$LOG"
       timeout "${SUITE_TIMEOUT:-240}" python3 "bench/$suite.py" --quick > /tmp/bench.log 2>&1; echo "$suite rc=$?"
       cat /tmp/bench.log >> "$LOG"; tail -25 /tmp/bench.log ;;
  esac
  echo "== $suite took $(( $(date +%s) - start )) s"
done
