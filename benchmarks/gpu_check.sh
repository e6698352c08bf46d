#!/usr/bin/env bash
# The GPU check, on a machine with one CUDA device: versions, ViT-B/16 training throughput of the mtvision trainer
# against a plain timm loop (bf16 autocast, then fp16 with a grad scaler), then the test suite with CUDA visible.
#
#     bash benchmarks/gpu_check.sh [LOG_DIR]      # logs of each part go to LOG_DIR (default gpu_check_logs/)
#
# Expects mtvision's dependencies importable (installed, or on PYTHONPATH) and the synthetic data, which it
# generates under data/synthetic when missing.
set -uo pipefail
cd "$(dirname "$0")/.."
logs=${1:-gpu_check_logs}
mkdir -p "$logs"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c 'import torch, timm, torchvision; print("torch", torch.__version__, "CUDA", torch.version.cuda,
"torchvision", torchvision.__version__, "timm", timm.__version__, "|", torch.cuda.get_device_name(),
"|", torch.get_num_threads(), "threads")' || exit 1

for amp in bf16 fp16; do
    echo "== ViT-B/16 at 224 px, batch 128, $amp autocast: plain timm loop vs mtvision Trainer"
    timeout 240 python3 benchmarks/train_step.py --preset vit-b16 --amp "$amp" --batch-size 128 --num-workers 12 \
        --steps 20 --warmup 5 --repeats 3 2>&1 | tee "$logs/train_step_vit-b16_$amp.log" | grep -v '^\s*$' || status=1
done

echo "== the test suite with CUDA visible"
timeout 300 python3 -m pytest tests -q -p no:cacheprovider 2>&1 | tee "$logs/tests.log" | tail -40 || status=1
exit $status
