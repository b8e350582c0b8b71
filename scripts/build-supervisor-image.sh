#!/usr/bin/env bash
# Build the supervisor's image (top-level Dockerfile) with the build's network off.
#
#   bash scripts/build-supervisor-image.sh [--tag TAG]      prints the tag on success
#
# The base image and the agent wheelhouse come from `massgen-run image build` (run here when
# the base is missing). The supervisor's extra dependencies are wheeled on the host into
# $MASSGEN_CACHE_DIR/supervisor-wheels (default ~/.cache/massgen-sandbox): from local wheels
# only when they suffice, through pip's configured index otherwise; a wheel of this project is
# built from a copy of the source (so the work tree gets no build/ or egg-info). All of it goes
# into a throwaway context dir, and `docker build --network none` installs from there.
# Env: PYTHON (CPython 3.11, like the base's python3), BASE_IMAGE, MASSGEN_CACHE_DIR.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
repo=$PWD

tag=massgen-sandbox/supervisor:latest
while [[ $# -gt 0 ]]; do
  case $1 in
    --tag) tag=$2; shift 2 ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "build-supervisor-image: unknown argument $1" >&2; exit 2 ;;
  esac
done

py=${PYTHON:-}
if [[ -z $py ]]; then
  for candidate in .venv/bin/python python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1; then py=$candidate; break; fi
  done
fi
if ! "$py" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  echo "build-supervisor-image: wheels must be built by CPython 3.11 (the base image's python3); set PYTHON" >&2
  exit 1
fi

base=${BASE_IMAGE:-massgen-sandbox/base:bookworm}
cache=${MASSGEN_CACHE_DIR:-$HOME/.cache/massgen-sandbox}
agent_wheels=$cache/wheels
sup_wheels=$cache/supervisor-wheels
if ! docker image inspect "$base" >/dev/null 2>&1 || [[ ! -d $agent_wheels ]]; then
  echo "build-supervisor-image: building the base image and wheelhouse first" >&2
  (cd "$repo" && "$py" -m supervisor.cli image build >&2)
fi
mkdir -p "$sup_wheels"

ctx=$(mktemp -d "${TMPDIR:-/tmp}/massgen-supervisor-ctx.XXXXXX")
trap 'rm -rf "$ctx"' EXIT
mkdir -p "$ctx/src" "$ctx/wheels"
cp -r pyproject.toml README.md agent_image supervisor "$ctx/src/"
find "$ctx/src" -name __pycache__ -prune -exec rm -rf {} +
cp -r configs "$ctx/configs"
cp Dockerfile "$ctx/Dockerfile"

pip_wheel() { "$py" -m pip wheel -q --disable-pip-version-check "$@"; }
local_only=(--no-index --find-links "$sup_wheels" --find-links "$agent_wheels")
via_index=(--find-links "$sup_wheels" --find-links "$agent_wheels")

# setuptools for the project's isolated build, kept so that the next build needs no index
if ! compgen -G "$sup_wheels/setuptools-*.whl" >/dev/null; then
  pip_wheel "${via_index[@]}" --wheel-dir "$sup_wheels" "setuptools>=68"
fi
echo "build-supervisor-image: wheel of the project" >&2
pip_wheel "${local_only[@]}" --no-deps --wheel-dir "$ctx/wheels" "$ctx/src" 2>/dev/null \
  || pip_wheel "${via_index[@]}" --no-deps --wheel-dir "$ctx/wheels" "$ctx/src"
project=$(compgen -G "$ctx/wheels/massgen_sandbox-*.whl")
echo "build-supervisor-image: dependency wheels in $sup_wheels" >&2
pip_wheel "${local_only[@]}" --wheel-dir "$sup_wheels" "$project" 2>/dev/null \
  || pip_wheel "${via_index[@]}" --wheel-dir "$sup_wheels" "$project"
rm -f "$sup_wheels"/massgen_sandbox-*.whl
for w in "$sup_wheels"/*.whl; do
  ln "$w" "$ctx/wheels/" 2>/dev/null || cp "$w" "$ctx/wheels/"
done
rm -rf "$ctx/src"

echo "build-supervisor-image: docker build --network none -t $tag" >&2
previous=$(docker image inspect -f '{{.Id}}' "$tag" 2>/dev/null || true)
docker build -q --network none --build-arg "BASE_IMAGE=$base" \
  --label "io.massgen.image=supervisor" -t "$tag" "$ctx" >&2
# The project wheel differs on every build, so the image replaced under this tag is no cache
# worth keeping; remove it unless something (a running service) still uses it.
current=$(docker image inspect -f '{{.Id}}' "$tag")
if [[ -n $previous && $previous != "$current" ]]; then
  docker image rm "$previous" >/dev/null 2>&1 || true
fi
# Likewise the untagged install stages the builder leaves behind (only ours, by label).
docker image prune -f --filter "label=io.massgen.image=supervisor-deps" >/dev/null 2>&1 || true
echo "$tag"
