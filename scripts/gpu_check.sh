#!/usr/bin/env bash
# GPU check of the cwdpo stack on one GPU, offline, in one command (<= 8 minutes on one H200): the smoke
# test of a random-init Qwen2.5-VL-3B (bf16 training MFU, generate tokens/s), then the jobs of the qwen3b
# rehearsal on the GPU with a random-init ~0.7B stand-in, asserting every model sat on cuda. Writes one
# JSON ($OUT/gpu_check.json when $OUT is set, else results/gpu_check.json); see scripts/gpu_check.py.
# Needs no Snakemake and no network: what a GPU machine may lack (jsonschema and its needs) it installs from the
# wheels it carries (scripts/wheels/) into a scratch folder; `--wheels DIR` names another folder.
#   bash scripts/gpu_check.sh              # on the GPU machine
#   bash scripts/gpu_check.sh --cpu        # the same at toy sizes on a CPU (what the tests run)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec python scripts/gpu_check.py "$@"
