#!/usr/bin/env bash
# Packer job (issue 3, section 6): CPU work only, on the GPU machine's host CPU. Makes sure veofast._C is built
# from this csrc/, checks C++ == Python (tests/data/test_packing.py), then runs bench/packer.py and prints its
# tables: C++ vs Python sequences/s and speed-up at n = 200 / 2000 / 100k (budget 8192) and at n = 200 for budgets
# 2048..131072, the fixed cost of a C++ call, and the packing efficiency with buffers 200 and 2000.
# Usage (repo root): OUT=<dir> bash tools/gpu_jobs/packer.sh. At most 120 s (timeouts 10 + 40 + 10 + 20 + 40);
# one log, $OUT/packer.log, and the bench's JSON lines, $OUT/packer.jsonl.
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export VEOFAST_BENCH_RESULTS="$OUT" PYTHONUNBUFFERED=1
LOG="$OUT/packer.log"
PY=${PYTHON:-python3}
: > "$LOG"

echo "== host: $(nproc) cores; $(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -1); $($PY --version 2>&1)"

# 1. veofast._C must be this csrc/ (an install of this tree built it). If it is stale, rebuild it aside and rename
#    it into veofast/: other jobs may have the old one mapped, and a rename never changes a file under them.
FRESH="from veofast import _C; assert hasattr(_C, 'MAX_BUDGET'), 'stale'; print('veofast._C fresh:', _C.__file__)"
if ! timeout 10 $PY -c "$FRESH" >> "$LOG" 2>&1; then
  rm -rf /tmp/packer_build
  timeout 40 $PY setup.py build_ext --build-lib /tmp/packer_build --build-temp /tmp/packer_build/tmp --force \
    >> "$LOG" 2>&1
  echo "rebuilt veofast._C: rc=$?"
  for so in /tmp/packer_build/veofast/_C*.so; do
    [ -f "$so" ] && cp "$so" veofast/.packer_C.tmp && mv -f veofast/.packer_C.tmp "veofast/$(basename "$so")"
  done
  timeout 10 $PY -c "$FRESH" >> "$LOG" 2>&1 \
    || { echo "!! veofast._C missing or stale: the C++ numbers below are NOT this code's"; grep -iE "error" "$LOG" | head -8; }
fi
tail -1 "$LOG"

# 2. C++ == Python on random inputs, buffer inputs, threads, the batcher's hand example
timeout 20 $PY -m pytest -q -p no:cacheprovider tests/data/test_packing.py > /tmp/packer_tests.log 2>&1
echo "packer tests rc=$?: $(tail -1 /tmp/packer_tests.log)"
grep -E "^(FAILED|ERROR)" /tmp/packer_tests.log | head -10
cat /tmp/packer_tests.log >> "$LOG"

# 3. the benchmark (single-threaded: "one core"; not pinned, other jobs may share this host); full size
timeout 40 $PY bench/packer.py > /tmp/packer_bench.log 2>&1
echo "bench rc=$?"
cat /tmp/packer_bench.log >> "$LOG"
tail -20 /tmp/packer_bench.log
