#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv, install the pinned CPU stack and the
# project itself (editable).
# torch is installed FIRST and pinned (constraints.txt) so pip never pulls the multi-GB CUDA wheels.
# Usage: source scripts/setup_env.sh      (leaves the venv activated)
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-$REPO/.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "== creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1
# DeepSpeed: build the pure-Python package (no CUDA/C++ ops at install time; see requirements.txt)
export DS_BUILD_OPS=0
if ! python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null; then
  # PyPI's Linux torch wheels are the CUDA builds (GBs of nvidia-* packages); the CPU build (2.13.0+cpu, which
  # pip prefers to 2.13.0) is on PyTorch's own index: add it when it answers, else pip's configured sources.
  TORCH_CPU_INDEX="${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}"
  if python -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)" \
      "$TORCH_CPU_INDEX/torch/" 2>/dev/null; then
    echo "== installing torch==2.13.0 (CPU build, from $TORCH_CPU_INDEX)"
    pip install -q torch==2.13.0 --extra-index-url "$TORCH_CPU_INDEX"
  else
    echo "== installing torch==2.13.0 ($TORCH_CPU_INDEX unreachable: from pip's configured sources)"
    pip install -q torch==2.13.0
  fi
fi
if ! python - "$REPO/requirements.txt" <<'PY' 2>/dev/null
import sys
from importlib.metadata import version, PackageNotFoundError
from packaging.requirements import Requirement
for line in open(sys.argv[1]):
    line = line.split("#")[0].strip()
    if not line:
        continue
    req = Requirement(line)
    try:
        if not req.specifier.contains(version(req.name), prereleases=True):
            sys.exit(1)
    except PackageNotFoundError:
        sys.exit(1)
PY
then
  echo "== installing requirements.txt (constrained to torch==2.13.0)"
  pip install -q -c "$REPO/constraints.txt" -r "$REPO/requirements.txt"
fi
# the project itself, editable (packages megatron_nbp, data_prep and nbp_common, the nbp-* console scripts)
if ! python - "$REPO" <<'PY' 2>/dev/null
import json, sys
from importlib.metadata import distribution
url = json.loads(distribution("megatron-nbp").read_text("direct_url.json") or "{}")
sys.exit(url.get("url") != "file://" + sys.argv[1] or not url.get("dir_info", {}).get("editable"))
PY
then
  INSTALL_PROJECT=1
fi
# pyproject.toml changed since the last install (new package, console script, version): install again
STAMP="$VENV/.megatron-nbp-pyproject.sha256"
if [ "$(sha256sum "$REPO/pyproject.toml" | cut -d' ' -f1)" != "$(cat "$STAMP" 2>/dev/null)" ]; then
  INSTALL_PROJECT=1
fi
if [ -n "${INSTALL_PROJECT:-}" ]; then
  echo "== installing the project (pip install -e .)"
  pip install -q --no-deps --no-build-isolation -e "$REPO"
  sha256sum "$REPO/pyproject.toml" | cut -d' ' -f1 > "$STAMP"
fi
# (megatron-core warns at import that Transformer Engine / apex are missing: expected on CPU, silenced here;
# an import error still prints its traceback)
python -W ignore -c "import torch, megatron.core, megatron_nbp; print(f'== environment ready: torch {torch.__version__}, megatron-core {megatron.core.__version__}, megatron-nbp {megatron_nbp.__version__}')"
