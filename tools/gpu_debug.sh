#!/usr/bin/env bash
# Isolate the illegal memory access of the tiny-model training on one GPU: each variant runs 3 steps.
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
python3 -m pip install -q --no-build-isolation --no-deps -e . > /dev/null 2>&1
run() {
  name=$1; shift
  timeout 90 torchrun --nproc_per_node=1 tasks/train.py "$@" --train.max_steps 3 --train.save_steps 0 \
    --train.output_dir /tmp/dbg_$name > "$OUT/$name.log" 2>&1
  echo "$name rc=$? $(grep -m1 -E 'Error|error:' "$OUT/$name.log" | cut -c1-200)"
  grep -m3 'File "/work/main' "$OUT/$name.log" | tail -2
}
export CUDA_LAUNCH_BLOCKING=1
run moe_auto configs/moe.yaml
run moe_torch_nomp configs/moe.yaml --model.ops_backend torch --train.enable_mixed_precision false
run dense_torch configs/dense.yaml --model.ops_backend torch
run moe_torch_ddp configs/moe.yaml --model.ops_backend torch --train.data_parallel_mode ddp
run dense_auto_untied configs/dense.yaml --model.config_overrides '{model_type: llama, vocab_size: 1024, hidden_size: 128, intermediate_size: 384, num_hidden_layers: 2, num_attention_heads: 2, num_key_value_heads: 1, tie_word_embeddings: false}'
