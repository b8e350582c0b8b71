#!/usr/bin/env bash
# Lint, format and type checks (CI runs this before the tests).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
py=.venv/bin/python
[[ -x $py ]] || py=python3
$py -m ruff check .
$py -m ruff format --check .
$py -m mypy agent_image supervisor tests
