#!/usr/bin/env bash
# GPU check: posttrain against TRL (+PEFT) on a Qwen2-0.5B-shaped model (random weights, built here),
# full and LoRA SFT at 2k tokens, DPO, GRPO generation and update; one JSON on stdout (progress on
# stderr). One H100/H200, about 3-5 minutes, hard limit 8. Never run in CI.
#
#   bash bench/gpu_check.sh                 # writes gpu-check.json too
#   PYTHON=/path/to/python bash bench/gpu_check.sh --rows sft_lora,dpo_lora
#
# Needs a CUDA build of torch with transformers, trl, peft and datasets (`pip install -e ".[bench]"`
# after a CUDA torch); nothing is downloaded at run time.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA device visible to $PY (torch $("$PY" -c 'import torch; print(torch.__version__)'))" >&2
    exit 2
fi
"$PY" -c "import posttrain" 2>/dev/null || "$PY" -m pip install -q --no-deps -e .
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >&2 || true
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false TRANSFORMERS_VERBOSITY=error
exec timeout 480 "$PY" bench/gpu_check.py --out gpu-check.json "$@"
