#!/usr/bin/env bash
# The remote-docker test engine: a second dockerd in netns massgen-remote, TLS on 10.201.0.2:2376.
# Usage: scripts/remote-engine.sh up|down|status|env [--export]|push [IMAGE]  (see tests/remote/engine.py)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec .venv/bin/python -m tests.remote.engine "$@"
