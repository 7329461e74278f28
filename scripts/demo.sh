#!/usr/bin/env bash
# The main job on a local default: 3 etcd members, a simulated chain with two producer
# nodes, and two real agents, with a live view and keys to inject faults.
# Pass --script to play a fixed sequence of failovers without a terminal.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/bpleader demo "$@"
