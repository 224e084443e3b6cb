#!/bin/bash
# The one-run CPU table of docs/results.md ("One CT volume end to end"): run it on an otherwise idle machine, from the
# repository root, with ../shared/data beside the checkout (and the [openvino] extra installed).
set -e
V=${BTCV:-../shared/data/BTCV-Synapse-CT}
python benchmarks/volume.py --volume $V/volumes/case0001.nii.gz --labels $V/labels/case0001.nii.gz \
  --model litemedsam --model imedsam-litemedsam-btcv --backend torch --backend openvino --backend openvino:bf16 \
  --protocol labels boxes3d \
  --num_threads 2 --device cpu --json benchmarks/results/volume_case0001_cpu.json
for backend in torch openvino openvino:bf16; do
  python benchmarks/multi_prompt.py --image $V/images/case0039_slice068.png --mask $V/masks/case0039_slice068.png \
    --model imedsam-litemedsam-btcv --backend $backend --num_threads 2 --device cpu \
    --json benchmarks/results/multi_prompt_btcv_${backend/:/_}_cpu.json
done
python benchmarks/multi_prompt.py --image $V/images/case0039_slice068.png --mask $V/masks/case0039_slice068.png \
  --model imedsam-litemedsam-btcv --query_region image --num_threads 2 --device cpu \
  --json benchmarks/results/multi_prompt_btcv_torch_image_query_cpu.json
python benchmarks/runtime.py --adapted --backends torch openvino --int8 --num_threads 2 --repeats 7 \
  --json benchmarks/results/runtime_imedsam_adapted_cpu.json
