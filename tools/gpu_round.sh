#!/usr/bin/env bash
# One batched session on a 4-GPU node: the per-area GPU jobs in tools/gpu_jobs/ side by side on separate GPUs,
# then 2-GPU diagnostics, then 4-GPU runs of the training entry point (ZeRO-3, kill-and-resume, EP=4).
# Every job writes into its own folder; at the end all of them are packed into $OUT/results.tar.gz, and the
# summary of each job goes to $OUT/round.log (the device tool brings back at most 8 files).
# Usage: bash tools/gpu_round.sh phase ...   phases: jobs explore diag confirm final steps multi curves maxlen maxlen4 ep2 ep2b sp2 one curves1 ce1 moe1 (each 3-6 minutes)
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
WORK=/tmp/round; rm -rf "$WORK"; mkdir -p "$WORK"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
[ -d .whl ] && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-build-isolation --no-deps -e . > "$WORK/install.log" 2>&1 || { tail "$WORK/install.log"; exit 1; }
LOG="$OUT/round.log"
phases=("$@")
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 )) s] $*" | tee -a "$LOG"; }

# job NAME GPUS TIMEOUT COMMAND...: runs with its own $OUT and results folder, output in $WORK/NAME/stdout.log
job() {
  local name=$1 gpus=$2 limit=$3; shift 3
  mkdir -p "$WORK/$name"
  ( export CUDA_VISIBLE_DEVICES=$gpus OUT="$WORK/$name" VEOFAST_BENCH_RESULTS="$WORK/$name"
    timeout "$limit" "$@" > "$WORK/$name/stdout.log" 2>&1; echo "rc=$?" >> "$WORK/$name/stdout.log" )
}

summary() {  # the tail of each named job's output into the round log
  for name in "$@"; do
    { echo "################ $name"; grep -v -E "UserWarning|warn_once|^W[0-9]{4}|\*{5}" "$WORK/$name/stdout.log" \
        | tail -c 6000; } >> "$LOG" 2>/dev/null
  done
}

loss_curves() {  # configs/moe.yaml for 200 steps on GPU 0, fast paths then torch references, and their comparison
  for backend in auto torch; do
    job "lc_$backend" 0 200 torchrun --nproc_per_node=1 --master_port=29661 tasks/train.py configs/moe.yaml \
      --train.max_steps 200 --train.save_steps 0 --train.eval_steps 100 --model.ops_backend $backend \
      --train.output_dir "$WORK/lc_$backend/run"
  done
  VEOFAST_BENCH_RESULTS="$WORK/lc_auto" python3 tools/compare_loss_curves.py "$WORK/lc_auto/run/metrics.jsonl" \
    "$WORK/lc_torch/run/metrics.jsonl" --label "configs/moe.yaml, 1 H200, 200 steps: fast paths vs torch" \
    >> "$WORK/lc_auto/stdout.log" 2>&1
}

for phase in "${phases[@]}"; do
  case "$phase" in
    jobs)  # per-area jobs on GPUs 0-3 (the packer on the CPU beside them), then the diagnostics on the freed GPUs
      stamp "phase jobs"
      job packer "" 150 bash tools/gpu_jobs/packer.sh &
      job attention 0 430 bash tools/gpu_jobs/attention.sh &
      job small_ops 1 330 bash tools/gpu_jobs/small_ops.sh &
      job moe 3 330 bash tools/gpu_jobs/moe.sh &
      wait
      summary attention small_ops packer moe ;;
    diag)
      stamp "phase diag"
      job ep_diag 0,1 150 torchrun --nproc_per_node=2 --master_port=29631 tools/gpu_jobs/ep_diag.py &
      job step_diag 2 200 python3 tools/gpu_jobs/step_diag.py moe:veofast moe:transformers+veofast &
      wait
      summary ep_diag step_diag ;;
    curves)  # fast paths vs torch references over 200 steps (GPU 0), the loss's GPU tests (GPU 1), Ulysses (GPUs 2,3)
      stamp "phase curves"
      loss_curves &
      job ulysses 2,3 200 torchrun --nproc_per_node=2 --master_port=29662 bench/ulysses.py --quick &
      job ce_tests 1 150 python3 -m pytest -q -m gpu tests/ops/test_cross_entropy.py -p no:cacheprovider &
      wait
      summary lc_auto ulysses ce_tests ;;
    confirm)  # the suites with the pinned configs: 1-GPU training steps, GPU tests, op and 2-GPU suites
      stamp "phase confirm"
      job train 0 300 python3 bench/train.py --quick --time-budget 250 &
      ( job gpu_tests 1 200 python3 -m pytest -q -m gpu tests/ops -p no:cacheprovider -k "not triton-grad-weight-load"
        job attention_bench 1 90 python3 bench/attention.py --quick ) &
      ( job moe_ep 2,3 100 torchrun --nproc_per_node=2 --master_port=29651 bench/moe_ep.py --repeats 10
        job fsdp2 2,3 120 torchrun --nproc_per_node=2 --master_port=29652 bench/train.py --fsdp --models dense,moe \
          --steps 8
        job cross_entropy 2 150 python3 bench/cross_entropy.py ) &
      wait
      summary train gpu_tests attention_bench moe_ep fsdp2 cross_entropy ;;
    explore)  # the attention sweep (GPU 0), the MoE job (GPU 1), Ulysses under NCCL CTA caps (GPUs 2,3)
      stamp "phase explore"
      job attention 0 430 bash tools/gpu_jobs/attention.sh &
      job moe 1 330 bash tools/gpu_jobs/moe.sh &
      job ulysses_ctas 2,3 330 bash tools/gpu_jobs/ulysses_ctas.sh &
      wait
      summary attention moe ulysses_ctas ;;
    final)  # the headline suites once more with the pinned configs: attention then training steps (GPU 0), every
      # cross-entropy shape (GPU 1), the attention GPU tests (GPU 2), an attention config sweep (GPU 3), the packer
      stamp "phase final"
      ( job attention_bench 0 120 python3 bench/attention.py --quick
        job train 0 300 python3 bench/train.py --quick --time-budget 240 ) &
      job cross_entropy 1 300 python3 bench/cross_entropy.py &
      job attention_tests 2 200 python3 -m pytest -q -m gpu tests/ops -k attention -p no:cacheprovider &
      job attention_sweep 3 280 python3 bench/attention.py --sweep --budget-s 200 --workers 12 &
      job packer "" 150 bash tools/gpu_jobs/packer.sh &
      wait
      summary attention_bench train cross_entropy attention_tests attention_sweep packer ;;
    steps)  # 2 GPUs: one-GPU training steps (dense then MoE, veofast and transformers) on GPU 0 beside the dense
      # step profile on GPU 1: how far bench/train.py's step time is from the profiled kernel time
      stamp "phase steps"
      job train_steps 0 220 python3 bench/train.py --providers veofast,transformers --steps 16 &
      job step_diag 1 200 python3 tools/gpu_jobs/step_diag.py dense:veofast &
      wait
      summary train_steps step_diag ;;
    maxlen)  # the longest sequence a 7B-shaped training step fits, with checkpointing: 1 GPU and 2 GPUs (SP=2);
      # the 1-GPU step profiles of bench/train.py's models on the GPU left free
      stamp "phase maxlen"
      job maxlen1 0 280 python3 bench/max_seqlen.py &
      job maxlen2 2,3 280 torchrun --nproc_per_node=2 --master_port=29671 bench/max_seqlen.py &
      job step_diag 1 250 python3 tools/gpu_jobs/step_diag.py dense:veofast moe:veofast &
      wait
      summary maxlen1 maxlen2 step_diag ;;
    ep2)  # 2 GPUs: the EP=2 layer and its all-to-all, the copy-engine all-to-all probe, the Ulysses layer over both
      # transports
      stamp "phase ep2"
      job moe_ep 0,1 120 torchrun --nproc_per_node=2 --master_port=29651 bench/moe_ep.py --repeats 20
      job ce_a2a 0,1 120 torchrun --nproc_per_node=2 --master_port=29690 tools/gpu_jobs/ce_a2a.py
      job ulysses_ce 0,1 150 torchrun --nproc_per_node=2 --master_port=29662 bench/ulysses.py --quick \
        --transport copy_engine
      job ulysses_nccl 0,1 150 torchrun --nproc_per_node=2 --master_port=29663 bench/ulysses.py --quick
      summary moe_ep ce_a2a ulysses_ce ulysses_nccl ;;
    ep2b)  # 2 GPUs: both EP token dispatches side by side, where the all-gather dispatch's time goes, EP=2 training
      # through the entry point and in bench/train.py; the Ulysses layer with head-chunked pipelines, both transports
      stamp "phase ep2b"
      job moe_ep 0,1 150 torchrun --nproc_per_node=2 --master_port=29651 bench/moe_ep.py --repeats 20
      job ep_diag 0,1 120 torchrun --nproc_per_node=2 --master_port=29652 tools/gpu_jobs/ep_diag.py
      job train_ep2 0,1 150 torchrun --nproc_per_node=2 --master_port=29653 tasks/train.py configs/moe.yaml \
        --train.expert_parallel_size 2 --train.max_steps 10 --train.save_steps 0 --train.eval_steps 10 \
        --train.output_dir "$WORK/train_ep2/run"
      tail -2 "$WORK/train_ep2/run/metrics.jsonl" >> "$WORK/train_ep2/stdout.log" 2>&1
      job bench_ep2 0,1 240 torchrun --nproc_per_node=2 --master_port=29654 bench/train.py --fsdp --ep 2 --models moe \
        --quick
      job ulysses_ce 0,1 200 torchrun --nproc_per_node=2 --master_port=29662 bench/ulysses.py --quick \
        --transport copy_engine --head-chunks 4 2 1
      job ulysses_nccl 0,1 150 torchrun --nproc_per_node=2 --master_port=29663 bench/ulysses.py --quick \
        --head-chunks 4 1
      summary moe_ep ep_diag train_ep2 bench_ep2 ulysses_ce ulysses_nccl ;;
    sp2)  # 2 GPUs: the training entry point with Ulysses SP=2 over each transport (losses must agree), and the
      # Ulysses layer bench (full rounds) with 2 head chunks and unchunked over the copy engines
      stamp "phase sp2"
      for transport in copy_engine nccl; do
        job "train_sp2_$transport" 0,1 150 torchrun --nproc_per_node=2 --master_port=29671 tasks/train.py \
          configs/moe.yaml --train.ulysses_parallel_size 2 --train.ulysses_transport $transport \
          --train.max_steps 10 --train.save_steps 0 --train.eval_steps 10 --train.output_dir "$WORK/train_sp2_$transport/run"
        tail -2 "$WORK/train_sp2_$transport/run/metrics.jsonl" >> "$WORK/train_sp2_$transport/stdout.log" 2>&1
      done
      VEOFAST_BENCH_RESULTS="$WORK/train_sp2_copy_engine" python3 tools/compare_loss_curves.py \
        "$WORK/train_sp2_copy_engine/run/metrics.jsonl" "$WORK/train_sp2_nccl/run/metrics.jsonl" \
        --label "configs/moe.yaml, SP=2 on 2 H200, 10 steps: copy-engine vs NCCL all-to-alls" \
        >> "$WORK/train_sp2_copy_engine/stdout.log" 2>&1
      job ulysses_full 0,1 300 torchrun --nproc_per_node=2 --master_port=29664 bench/ulysses.py \
        --transport copy_engine --head-chunks 2 1
      summary train_sp2_copy_engine train_sp2_nccl ulysses_full ;;
    curves1)  # 1 GPU: fast paths vs torch references over 200 steps (one rank: per-layer casts, no FSDP)
      stamp "phase curves1"
      loss_curves
      summary lc_auto lc_torch ;;
    ce1)  # 1 GPU: the cross-entropy suite at N=4096 (the one-chunk rule); the loss GPU tests
      stamp "phase ce1"
      job cross_entropy 0 200 python3 bench/cross_entropy.py --tokens 4096
      job ce_tests 0 120 python3 -m pytest -q -m gpu tests/ops/test_cross_entropy.py -p no:cacheprovider
      summary cross_entropy ce_tests ;;
    moe1)  # 1 GPU: the MoE op tests on the GPU, one EP=2 rank's expert work without communication
      stamp "phase moe1"
      job moe_tests 0 90 python3 -m pytest -q tests/ops/test_moe.py -p no:cacheprovider
      job ep_compute 0 60 python3 tools/gpu_jobs/ep_compute.py
      summary moe_tests ep_compute ;;
    one)  # 1 GPU: the MoE op tests on the GPU, then one-GPU training steps of every provider
      stamp "phase one"
      job moe_tests 0 120 python3 -m pytest -q tests/ops/test_moe.py -p no:cacheprovider
      job train_steps 0 330 python3 bench/train.py --providers veofast,transformers,transformers+liger --steps 12
      summary moe_tests train_steps ;;
    maxlen4)  # the same on 4 GPUs (SP=4)
      stamp "phase maxlen4"
      job maxlen4 0,1,2,3 280 torchrun --nproc_per_node=4 --master_port=29672 bench/max_seqlen.py
      summary maxlen4 ;;
    multi)
      stamp "phase multi"
      common=(tasks/train.py configs/moe.yaml --train.save_steps 0)
      job zero3 0,1,2,3 120 torchrun --nproc_per_node=4 "${common[@]}" --train.max_steps 10 \
        --train.enable_full_shard true --train.output_dir "$WORK/zero3/run"
      tail -2 "$WORK/zero3/run/metrics.jsonl" >> "$WORK/zero3/stdout.log" 2>&1
      kr=(tasks/train.py configs/moe.yaml --train.max_steps 12 --train.save_steps 6)
      job kr_full 0,1,2,3 90 torchrun --nproc_per_node=4 "${kr[@]}" --train.output_dir "$WORK/kr_full/run"
      job kr_killed 0,1,2,3 90 torchrun --nproc_per_node=4 "${kr[@]}" --train.output_dir "$WORK/kr/run" &
      while [ ! -f "$WORK/kr/run/checkpoints/global_step_6/COMPLETE" ] && [ $(( $(date +%s) - T0 )) -lt 3000 ] \
        && pgrep -f -- "--train.output_dir $WORK/kr/run" > /dev/null; do sleep 0.2; done
      pkill -9 -f -- "--train.output_dir $WORK/kr/run"; wait
      ls "$WORK/kr/run/checkpoints" >> "$WORK/kr_killed/stdout.log" 2>&1
      job kr_resume 0,1,2,3 90 torchrun --nproc_per_node=4 "${kr[@]}" --train.output_dir "$WORK/kr/run" \
        --train.load_path auto
      VEOFAST_BENCH_RESULTS="$WORK/kr_resume" python3 tools/compare_loss_curves.py "$WORK/kr_full/run/metrics.jsonl" \
        "$WORK/kr/run/metrics.jsonl" \
        --label "kill at step 6 and resume, 4 GPUs" >> "$WORK/kr_resume/stdout.log" 2>&1
      job ep4 0,1,2,3 120 torchrun --nproc_per_node=4 --master_port=29641 bench/train.py --fsdp --models moe \
        --ep 4 --steps 8
      job fsdp4 0,1,2,3 90 torchrun --nproc_per_node=4 --master_port=29642 bench/train.py --fsdp --models dense \
        --steps 8
      summary zero3 kr_full kr_killed kr_resume ep4 fsdp4 ;;
    *) stamp "unknown phase $phase" ;;
  esac
done
stamp "done"
tar -C "$WORK" -czf "$OUT/results.tar.gz" --exclude='*/run/checkpoints' . 2>/dev/null
grep -E "^#####|rc=" "$LOG"
