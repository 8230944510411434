#!/usr/bin/env bash
# One prepared accelerator run (sized for the H200 lease: about 5 minutes). From the repository root:
#   bash benchmarks/device_check.sh            (writes logs and JSON under $OUT, default ./device_out)
# 1. the compiled Pallas verify kernel against its reference (the gpu-marked tests);
# 2. the GPU suite subset that exercises the loop and the models on the device;
# 3. the Qwen3-4B-shape benchmark (random bf16 weights, batch 1 and 32), JSON rewritten after every stage.
set -uo pipefail
OUT=${OUT:-device_out}
mkdir -p "$OUT"
export PYTHONPATH=. PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python -c "import jax; print(jax.__version__, jax.devices())" | tee -a "$OUT/gpu.txt"
JAX_PLATFORMS=cuda timeout 120 python -m pytest -q -m gpu tests/test_verify_kernel.py 2>&1 | tee "$OUT/gpu_tests.log"
timeout 300 python -m dspark_jax.bench --random-shape qwen3-4b --batch 1 32 --max-new-tokens 128 \
    --out "$OUT/h200_qwen3_4b.json" 2>&1 | tee "$OUT/bench.log"
