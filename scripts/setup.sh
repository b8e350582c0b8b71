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
.venv/bin/massgen-run image build >/dev/null
