#!/usr/bin/env bash
# Ensure a Docker engine answers: install Debian's docker.io and start dockerd when needed.
# Harmless when an engine already runs.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
need=()
# The test suite also drives Debian's docker-compose (deployment test) and tmux (ops views);
# debootstrap builds the base image.
command -v docker-compose >/dev/null || need+=(docker-compose)
command -v tmux >/dev/null || need+=(tmux)
command -v debootstrap >/dev/null || need+=(debootstrap)
# The remote-docker test engine runs in its own network namespace, joined by a veth pair.
command -v ip >/dev/null || need+=(iproute2)
# The dashboard's browser tests drive Debian's chromium headless (Playwright, executable_path).
command -v chromium >/dev/null || need+=(chromium)
if ! docker info >/dev/null 2>&1; then
  command -v dockerd >/dev/null || need+=(docker.io)
  command -v runsc >/dev/null || need+=(runsc)
fi
if ((${#need[@]})) && [[ $(id -u) -eq 0 ]]; then
  echo "docker-up: installing ${need[*]}" >&2
  apt-get update -q >/dev/null
  apt-get install -y -q "${need[@]}" >/dev/null
fi
if docker info >/dev/null 2>&1; then exit 0; fi
# A stale pid file from a killed session stops dockerd from starting ("pid file found").
if [[ -f /var/run/docker.pid ]] && ! pgrep -x dockerd >/dev/null; then rm -f /var/run/docker.pid; fi
if [[ -S /run/containerd/containerd.sock ]] && ! pgrep -x containerd >/dev/null; then rm -f /run/containerd/containerd.sock; fi
mkdir -p /etc/docker
# Register gVisor as runtime "runsc" (ptrace works without KVM; no network of its own; host
# unix sockets allowed, for the per-run supervisor socket), keeping any other settings.
if command -v runsc >/dev/null; then
  RUNSC_PATH=$(command -v runsc) python3 - <<'PY'
import json, os, pathlib
path = pathlib.Path("/etc/docker/daemon.json")
config = json.loads(path.read_text() or "{}") if path.exists() else {}
runtimes = config.setdefault("runtimes", {})
if "runsc" not in runtimes:
    runtimes["runsc"] = {
        "path": os.environ["RUNSC_PATH"],
        "runtimeArgs": ["--platform=ptrace", "--network=none", "--host-uds=open"],
    }
    path.write_text(json.dumps(config) + "\n")
PY
fi
if ! pgrep -x dockerd >/dev/null; then
  nohup dockerd >/var/log/dockerd.log 2>&1 &
fi
for _ in $(seq 1 60); do
  docker info >/dev/null 2>&1 && exit 0
  sleep 1
done
echo "docker-up: dockerd did not answer within 60 s; see /var/log/dockerd.log" >&2
tail -20 /var/log/dockerd.log >&2 || true
exit 1
