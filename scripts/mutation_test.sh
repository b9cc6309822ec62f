#!/usr/bin/env bash
# Mutation testing (cosmic-ray) of the block-causal rule (megatron_nbp/masks.py), the token layouts
# (the megatron_nbp/layouts/ package), generation (megatron_nbp/inference/generate.py) and sampling
# (megatron_nbp/inference/sampling.py) against the fast
# unit tests that cover them. Not part of CI (tens of minutes on 2 cores); results in docs/testing.md.
#
# Usage: bash scripts/mutation_test.sh [--retest-survivors] [masks] [layouts] [generate] [sampling]   (default: all)
#   --retest-survivors  with an existing MUTATION_WORKDIR: test that folder's surviving mutants again against
#                       the current tests (killed mutants stay killed: tests are only ever added)
# Environment:
#   MUTATION_WORKDIR  where the copies of the tree, the sessions and the reports go (default: a new
#                     /tmp/nbp-mutation.XXXXXX); rerunning with the same folder resumes unfinished sessions
#   MUTATION_JOBS     mutants tested at once, each in its own copy of the tree (default 2)
#   MUTATION_TIMEOUT  seconds allowed for one mutant's tests (default 240; a timeout counts as killed and
#                     is reported apart)
#
# The checkout itself is never mutated: cosmic-ray rewrites files in place, so it works on copies of the
# tree under MUTATION_WORKDIR. Prints, per module: mutants, skipped (excluded operators, annotations),
# killed, timed out, survived, errors; every survivor (file:line, operator, source line) goes to
# MUTATION_WORKDIR/survivors.txt with its diff.
set -euo pipefail
main() {   # the whole script is read before it runs, so editing the file cannot disturb a run
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
if [ ! -x .venv/bin/python ]; then
  # shellcheck disable=SC1091
  source scripts/setup_env.sh
fi
PY="$REPO/.venv/bin/python"
CR_VERSION=8.7.0
if ! "$PY" -c "import cosmic_ray" 2>/dev/null; then
  echo "== installing cosmic-ray==$CR_VERSION into .venv"
  "$PY" -m pip install -q -c constraints.txt "cosmic-ray==$CR_VERSION"
fi
export PATH="$REPO/.venv/bin:$PATH"          # `python` in the test commands is the project's
export PYTHONWARNINGS=ignore PYTHONDONTWRITEBYTECODE=1 OMP_NUM_THREADS=1

RETEST=0
if [ "${1:-}" = "--retest-survivors" ]; then
  RETEST=1
  shift
fi
MODULES=("$@")
[ ${#MODULES[@]} -gt 0 ] || MODULES=(masks layouts generate sampling)
WORK="${MUTATION_WORKDIR:-$(mktemp -d /tmp/nbp-mutation.XXXXXX)}"
JOBS="${MUTATION_JOBS:-2}"
TIMEOUT="${MUTATION_TIMEOUT:-240}"
mkdir -p "$WORK"
WORK="$(cd "$WORK" && pwd)"
echo "== mutation testing with cosmic-ray $("$PY" -c 'from importlib.metadata import version; print(version("cosmic-ray"))'), $JOBS at a time, in $WORK"

# one copy of the tree per job (mutants are written into these copies only)
for j in $(seq 1 "$JOBS"); do
  rm -rf "$WORK/tree$j"
  mkdir -p "$WORK/tree$j"
  tar -C "$REPO" --exclude=./.venv --exclude=./.git --exclude=./runs --exclude=./outputs --exclude=./data \
      --exclude=__pycache__ -cf - . | tar -C "$WORK/tree$j" -xf -
done

PYTEST="python -m pytest -x -q -p no:cacheprovider"
LAYOUT_TESTS="tests/unit/test_masks_layouts.py tests/unit/test_layouts_hybrid.py tests/unit/test_layouts_paper.py \
tests/unit/test_kv_cache.py tests/unit/test_generation_e2e.py tests/unit/test_generation.py"
# test_attention_kernels imports megatron-core (seconds): run it only when the fast files pass
declare -A PATHS=([masks]=megatron_nbp/masks.py [layouts]=megatron_nbp/layouts
                  [generate]=megatron_nbp/inference/generate.py [sampling]=megatron_nbp/inference/sampling.py)
declare -A TESTS=(
  [masks]="sh -c '$PYTEST $LAYOUT_TESTS && $PYTEST tests/unit/test_attention_kernels.py'"
  [layouts]="sh -c '$PYTEST $LAYOUT_TESTS && $PYTEST tests/unit/test_attention_kernels.py'"
  [generate]="$PYTEST tests/unit/test_generation_e2e.py tests/unit/test_generation.py tests/unit/test_kv_cache.py tests/unit/test_layouts_paper.py"
  [sampling]="$PYTEST tests/unit/test_generation_e2e.py tests/unit/test_generation.py tests/unit/test_kv_cache.py tests/unit/test_layouts_paper.py"
)

# Operators left out: replacements that only raise type errors on tensors or duplicate another mutant
# (arithmetic <-> bitwise, anything -> ** >> <<, comparisons -> is / is not, unary -> not).
EXCLUDED='"core/ReplaceBinaryOperator_\\w+_(Pow|RShift|LShift)$",
  "core/ReplaceBinaryOperator_(Add|Sub|Mul|Div|FloorDiv|Mod|Pow)_(BitOr|BitAnd|BitXor)$",
  "core/ReplaceBinaryOperator_(BitOr|BitAnd|BitXor|RShift|LShift)_(Add|Sub|Mul|Div|FloorDiv|Mod)$",
  "core/ReplaceComparisonOperator_(Lt|LtE|Gt|GtE|Eq|NotEq)_(Is|IsNot)$",
  "core/ReplaceUnaryOperator_\\w+_Not$"'

WORKER_PIDS=()
cleanup() { for pid in "${WORKER_PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done; }
trap cleanup EXIT

URLS=""
if [ "$JOBS" -gt 1 ]; then   # cosmic-ray's http distributor: one worker per copy, on the loopback interface
  for j in $(seq 1 "$JOBS"); do
    port=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    # cosmic-ray's own http-worker, bound to 127.0.0.1 only (`cosmic-ray http-worker` listens on all interfaces)
    (cd "$WORK/tree$j" && exec python -c "import sys; from aiohttp import web
from cosmic_ray.distribution.http import handle_mutate_and_test
app = web.Application(); app.add_routes([web.post('/', handle_mutate_and_test)])
web.run_app(app, host='127.0.0.1', port=int(sys.argv[1]))" "$port" >"$WORK/worker$j.log" 2>&1) &
    WORKER_PIDS+=($!)
    URLS="$URLS\"http://127.0.0.1:$port\", "
    "$PY" - "$port" <<'PY'
import socket, sys, time
for _ in range(300):
    try:
        socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=1).close()
        sys.exit(0)
    except OSError:
        time.sleep(0.1)
sys.exit(f"worker on port {sys.argv[1]} did not start")
PY
  done
fi

for name in "${MODULES[@]}"; do
  path="${PATHS[$name]:?unknown module $name (masks, layouts, generate, sampling)}"
  cfg="$WORK/$name.toml" db="$WORK/$name.sqlite"
  {
    echo "[cosmic-ray]"
    echo "module-path = \"$path\""
    echo "timeout = $TIMEOUT"
    echo "excluded-modules = []"
    printf 'test-command = "%s"\n' "${TESTS[$name]}"
    echo "[cosmic-ray.filters.operators-filter]"
    echo "exclude-operators = [$EXCLUDED]"
    echo "[cosmic-ray.distributor]"
    if [ "$JOBS" -gt 1 ]; then
      echo 'name = "http"'
      echo "[cosmic-ray.distributor.http]"
      echo "worker-urls = [${URLS%, }]"
    else
      echo 'name = "local"'
    fi
  } >"$cfg"
  cd "$WORK/tree1"
  if [ "$RETEST" = 1 ] && [ -f "$db" ]; then
    python -c "import sqlite3, sys; c = sqlite3.connect(sys.argv[1])
n = c.execute(\"DELETE FROM work_results WHERE test_outcome = 'SURVIVED'\").rowcount; c.commit()
print(f'== $name: testing {n} surviving mutants again')" "$db"
  fi
  if [ ! -f "$db" ]; then
    echo "== $name: baseline (unmutated tests must pass)"
    cosmic-ray baseline "$cfg"
    cosmic-ray init "$cfg" "$db"
    cr-filter-operators "$db" "$cfg"
    # annotations are never evaluated (every module has `from __future__ import annotations`)
    python - "$db" <<'PY'
import ast, sys
from cosmic_ray.work_db import WorkDB, use_db
from cosmic_ray.work_item import WorkerOutcome, WorkResult

spans = {}
def annotations(path):
    source = open(path).read()
    assert "from __future__ import annotations" in source, path
    out = []
    for node in ast.walk(ast.parse(source)):
        anns = [node.annotation] if isinstance(node, (ast.arg, ast.AnnAssign)) and node.annotation else []
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.returns:
            anns.append(node.returns)
        out += [((a.lineno, a.col_offset), (a.end_lineno, a.end_col_offset)) for a in anns]
    return out
with use_db(sys.argv[1], WorkDB.Mode.open) as db:
    skip = []
    for item in db.pending_work_items:
        m = item.mutations[0]
        spans.setdefault(str(m.module_path), annotations(str(m.module_path)))
        if any(a <= tuple(m.start_pos) < b for a, b in spans[str(m.module_path)]):
            skip.append(item.job_id)
    if skip:
        db.set_multiple_results(skip, WorkResult(worker_outcome=WorkerOutcome.SKIPPED, output="Annotation"))
PY
  fi
  echo "== $name: testing mutants of $path ($(date '+%H:%M:%S'))"
  cosmic-ray exec "$cfg" "$db"
  cd "$REPO"
done

cd "$WORK/tree1"
python - "$WORK" "${MODULES[@]}" <<'PY'
import json, subprocess, sys
work, names = sys.argv[1], sys.argv[2:]
rows, survivors = [], []
for name in names:
    dump = subprocess.run(["cosmic-ray", "dump", f"{work}/{name}.sqlite"], capture_output=True, text=True, check=True)
    n = dict(mutants=0, skipped=0, killed=0, timeout=0, survived=0, error=0, pending=0)
    for line in dump.stdout.splitlines():
        item, result = json.loads(line)
        n["mutants"] += 1
        if result is None:
            n["pending"] += 1
        elif result["worker_outcome"] == "skipped":
            n["skipped"] += 1
        elif result["test_outcome"] == "survived":
            n["survived"] += 1
            m = item["mutations"][0]
            source = open(m["module_path"]).read().splitlines()[m["start_pos"][0] - 1].strip()
            survivors.append((m["module_path"], m["start_pos"][0], m["start_pos"][1], m["operator_name"], source,
                              result.get("diff") or ""))
        elif result["test_outcome"] == "killed":
            n["timeout" if result["output"] == "timeout" else "killed"] += 1
        else:
            n["error"] += 1
    rows.append((name, n))
print(f"{'module':10} {'mutants':>8} {'skipped':>8} {'tested':>7} {'killed':>7} {'timeout':>8} {'survived':>9} "
      f"{'error':>6} {'pending':>8}")
for name, n in rows:
    tested = n["mutants"] - n["skipped"] - n["pending"]
    print(f"{name:10} {n['mutants']:8} {n['skipped']:8} {tested:7} {n['killed']:7} {n['timeout']:8} "
          f"{n['survived']:9} {n['error']:6} {n['pending']:8}")
survivors.sort()
with open(f"{work}/survivors.txt", "w") as f:
    for path, line, col, op, source, diff in survivors:
        print(f"SURVIVED {path}:{line}:{col} {op}: {source}")
        f.write(f"{path}:{line}:{col} {op}\n{diff}\n")
print(f"survivors with their diffs: {work}/survivors.txt")
PY
}
main "$@"
