#!/usr/bin/env bash
# README's second command: the whole suite (unit and e2e) plus lint. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source tests/cluster/lib.sh
# The real-node tests (tests/e2e_real) need these packages; without root they skip, so a missing one only warns.
if [ "$(id -u)" -eq 0 ]; then ensure_debian_packages; else ensure_debian_packages || true; fi
ensure_go_on_path
ensure_venv
.venv/bin/python -m tests.cluster build --real
status=0
.venv/bin/ruff check . || status=$?
.venv/bin/ruff format --check . || status=$?
.venv/bin/python -m pytest tests "$@" || status=$?
exit "$status"
