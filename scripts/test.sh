#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite against the real Docker engine.
# Docker tests FAIL (never skip) here when the engine cannot be reached.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
bash scripts/check.sh
export MASSGEN_REQUIRE_DOCKER=1
exec .venv/bin/python -m pytest -q "$@"
