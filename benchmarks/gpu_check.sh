#!/usr/bin/env bash
# The GPU checks in one run (issue: resolution-free at constant cost): CUDA + bf16 autocast on real-size ViT-B,
# inference latency at 384 and 1024 px (dense vs adaptive vs the backbone's SAM forward), one training step's
# throughput. Writes JSON into ${OUT:-benchmarks/results}. Usage: bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")"
out="${OUT:-results}"
mkdir -p "$out"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0))"
for backbone in vit-b-384 vit-b-1024; do
  python3 inference_latency.py --backbone "$backbone" --mixed_precision bf16 --repeats 10 \
    --output_sizes 256 512 1024 2048 --max_dense_points 5000000 --json "$out/latency_${backbone}_bf16.json"
done
python3 training_step.py --backbone vit-b-384 --batch_size 8 --mixed_precision bf16 --repeats 5 --train_points 0 \
  --json "$out/train_step_vit-b-384_bf16_fullgrid.json"
python3 training_step.py --backbone vit-b-384 --batch_size 8 --mixed_precision bf16 --repeats 5 --train_points 4096 \
  --json "$out/train_step_vit-b-384_bf16.json"
