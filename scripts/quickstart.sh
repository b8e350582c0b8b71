#!/usr/bin/env bash
# Set up (if needed) and run the quickstart in its own container: no API keys needed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
exec .venv/bin/massgen-run --automation --config @examples/quickstart "${1:-What is 2+2?}"
