#!/usr/bin/env bash
# Set up the environment (if needed) and run the whole test suite on CPU.
# Usage: bash scripts/test.sh [extra pytest args]
set -uo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
# shellcheck disable=SC1091
source scripts/setup_env.sh || exit 1
export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore}"
# any op DeepSpeed JIT-compiles is built once and reused by later runs
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/megatron-nbp/torch_extensions}"
python -m pytest -q -p no:cacheprovider tests "$@"
status=$?
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests: failing" >&2
  exit 1
fi
exit "$status"
