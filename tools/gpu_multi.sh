#!/usr/bin/env bash
# One batched session on a 4-GPU node. Phase 1 runs side by side on separate GPUs: the 1-GPU training benchmark
# (GPU 0), the fast-path vs torch-reference loss curves (GPU 1), and the 2-GPU expert-parallel, Ulysses and FSDP
# suites (GPUs 2,3). Phase 2 (if time is left) runs 4-GPU FSDP scaling and a 4-GPU kill-and-resume.
# Logs and JSON lines go to $OUT (at most 8 files come back).
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export VEOFAST_BENCH_RESULTS="$OUT" PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
[ -d .whl ] && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-build-isolation --no-deps -e . > "$OUT/multi.log" 2>&1 || exit 1
T0=$(date +%s)
(CUDA_VISIBLE_DEVICES=0 timeout 420 python3 bench/train.py --quick > "$OUT/train.log" 2>&1; echo "train rc=$?" >> "$OUT/train.log") &
(
  export CUDA_VISIBLE_DEVICES=1
  for backend in auto torch; do
    timeout 200 torchrun --nproc_per_node=1 --master_port=29611 tasks/train.py configs/moe.yaml --train.max_steps 200 --train.save_steps 0 \
      --train.eval_steps 100 --model.ops_backend $backend --train.output_dir /tmp/lc_$backend; echo "lc $backend rc=$?"
  done
  python3 tools/compare_loss_curves.py /tmp/lc_auto/metrics.jsonl /tmp/lc_torch/metrics.jsonl \
    --label "configs/moe.yaml on 1 H200, 200 steps: triton fast paths vs torch references"
) > "$OUT/loss.log" 2>&1 &
(
  export CUDA_VISIBLE_DEVICES=2,3
  # concurrent torchruns need distinct rendezvous ports
  run2() { echo "=== $*"; timeout "$1" torchrun --nproc_per_node=2 --master_port=29622 "${@:2}"; echo "rc=$?"; }
  run2 150 bench/moe_ep.py --repeats 10
  run2 150 bench/ulysses.py --quick
  run2 150 bench/train.py --fsdp --models dense,moe --steps 8
) >> "$OUT/multi.log" 2>&1 &
wait
echo "phase 1 took $(( $(date +%s) - T0 )) s" | tee -a "$OUT/multi.log"
if [ $(( $(date +%s) - T0 )) -lt 430 ]; then
  (
    echo "=== 4-GPU FSDP dense"; timeout 120 torchrun --nproc_per_node=4 bench/train.py --fsdp --models dense --steps 8
    echo "rc=$?"
    echo "=== 4-GPU ZeRO-3 training of the embedded default"
    timeout 90 torchrun --nproc_per_node=4 tasks/train.py configs/moe.yaml --train.max_steps 10 --train.save_steps 0 \
      --train.enable_full_shard true --train.output_dir /tmp/zero3 > /dev/null 2>&1
    echo "rc=$?"; tail -1 /tmp/zero3/metrics.jsonl
    echo "=== 4-GPU kill and resume"
    common=(tasks/train.py configs/moe.yaml --train.max_steps 12 --train.save_steps 6)
    timeout 60 torchrun --nproc_per_node=4 "${common[@]}" --train.output_dir /tmp/kr_full > /dev/null 2>&1
    echo "full rc=$?"
    timeout 60 torchrun --nproc_per_node=4 "${common[@]}" --train.output_dir /tmp/kr > /dev/null 2>&1 &
    pid=$!
    while [ ! -f /tmp/kr/checkpoints/global_step_6/COMPLETE ] && kill -0 $pid 2>/dev/null; do sleep 0.2; done
    pkill -9 -f -- "--train.output_dir /tmp/kr$"; sleep 2
    ls /tmp/kr/checkpoints
    timeout 60 torchrun --nproc_per_node=4 "${common[@]}" --train.output_dir /tmp/kr --train.load_path auto > /dev/null 2>&1
    echo "resume rc=$?"
    python3 - <<'PY'
import json
def losses(p):
    return {r["step"]: r["loss"] for r in map(json.loads, open(p))}
a, b = losses("/tmp/kr_full/metrics.jsonl"), losses("/tmp/kr/metrics.jsonl")
diff = max(abs(a[s] - b[s]) / abs(a[s]) for s in range(7, 13))
print("kill-resume 4 GPUs, steps 7-12: max rel diff", diff, [(a[s], b[s]) for s in (7, 12)])
PY
  ) >> "$OUT/multi.log" 2>&1
fi
echo "total $(( $(date +%s) - T0 )) s" | tee -a "$OUT/multi.log"
tail -4 "$OUT/loss.log"; grep -E "rc=|===|phase|kill-resume" "$OUT/multi.log" | tail -20
