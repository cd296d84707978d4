#!/usr/bin/env bash
# The GPU check: every model stage with --compute-device auto against the CPU on a small random checkpoint
# (benchmarks/gpu_check.py), then the Llama-2-7B-width bench at 2 and 8 layers on the device auto picks (time per
# stage, peak host and GPU memory; benchmarks/bench_scale.py). Needs torch, transformers, safetensors and
# accelerate (no Prefect, no network); about 8 minutes on one GPU. On a machine without a GPU every stage runs on
# the CPU (a mechanical run: tests/test_gpu_check.py).
#
#   benchmarks/gpu_check.sh [SCRATCH_DIR] [BENCH_LAYERS...]     # defaults: the system's temporary folder, 2 8
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ]; then PY=.venv/bin/python; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
scratch=${1:-${TMPDIR:-/tmp}}
shift || true
layers=("$@")
[ ${#layers[@]} -gt 0 ] || layers=(2 8)
"$PY" -c 'import torch, transformers, safetensors, accelerate' || {
    echo "gpu_check: needs torch, transformers, safetensors and accelerate" >&2; exit 2; }
status=0
"$PY" benchmarks/gpu_check.py --dir "$scratch" || status=1
"$PY" benchmarks/bench_scale.py --dir "$scratch" --layers "${layers[@]}" --compute-device auto \
    --gptq-layers 2 --measure-layers 2 || status=1
exit $status
