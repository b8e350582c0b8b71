#!/usr/bin/env bash
# One-time (and idempotent) setup: a Docker engine, the project in .venv, the sandbox images.
# Safe to re-run; everything cached is reused, nothing cached is required.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash .ci/docker-up.sh

# The image's python3 is Debian 12's 3.11 and the wheelhouse is built by this interpreter.
py=$(command -v python3.11 || command -v python3)
if [[ ! -x .venv/bin/python ]]; then
  "$py" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test,dev]'
# Bytecode for the project's own sources (pip compiled the venv's): environments that set
# PYTHONDONTWRITEBYTECODE=1 never cache it, and every `massgen-run` would compile ~60 ms of
# source again. Reading .pyc files is unaffected by that variable; stale ones are recompiled
# in memory (mtime check), so editing a file is always safe.
.venv/bin/python -m compileall -q supervisor agent_image bench >/dev/null
.venv/bin/massgen-run image build >/dev/null
