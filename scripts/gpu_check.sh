#!/usr/bin/env bash
# On a machine with one CUDA GPU, in a few minutes: the GPU tests, then the bench of three
# methods on the shipped base (bf16 and TF32), written to results/bench_gpu.json.
#   make setup TORCH='torch>=2.5'   # a CUDA build of torch
#   bash scripts/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
$BIN/python -m pytest -q -m gpu tests/test_gpu.py
$BIN/lora-diffusion bench --methods lora_diffusion,lora,full --device cuda --bf16 --tf32 \
    --batch-size 64 --prompt-length 112 --response-length 16 --steps 20 --warmup 5 \
    --out results/bench_gpu.json
