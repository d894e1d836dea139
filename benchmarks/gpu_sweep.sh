#!/usr/bin/env bash
# GPU training speed: GPT-2 124M (vocabulary 50304), context 1024, batch 32, bf16 autocast, compiled, and the
# settings that may raise its MFU: the fused output layer and loss, the cuDNN attention kernel, autotuned kernels.
# Each line is one process and prints tokens/s and MFU against the device's peak (gptlab/train/metrics.py).
#
#   bash benchmarks/gpu_sweep.sh [PYTHON]        (about 6 minutes on an H100/H200, compilation included)
#
# DEVICE, SHAPE, BATCH and STEPS override the defaults (DEVICE=cpu SHAPE=quickstart BATCH=12 checks the script).
set -euo pipefail
PY=${1:-python3}
DEVICE=${DEVICE:-cuda}
common=(benchmarks/train.py --device "$DEVICE" --shapes "${SHAPE:-gpt2-1024}" --dtypes bfloat16 --compile
        --only-compiled --steps "${STEPS:-10}" --rounds 2 --warmup 3 --batch "${BATCH:-32}")
"$PY" -c "import torch; print(torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
"$PY" "${common[@]}"                                                          # the table's row: vs transformers
"$PY" "${common[@]}" --no-transformers --loss-chunks 0,8192                   # fused output layer and loss
if [ "$DEVICE" = cuda ]; then
  "$PY" "${common[@]}" --no-transformers --attention cudnn --loss-chunks 0,8192  # cuDNN attention
fi
"$PY" "${common[@]}" --no-transformers --compile-mode max-autotune-no-cudagraphs --loss-chunks 8192
