#!/usr/bin/env bash
# The whole test suite: lint, type-check, then every test (unit, simulator, and the
# integration tests that run real etcd members and real agent processes).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export PATH="$PWD/.venv/bin:$PATH"
echo "== ruff" && ruff check src tests benchmarks
echo "== mypy" && mypy
echo "== pytest" && exec pytest -q -p no:cacheprovider --durations=25 "$@"
