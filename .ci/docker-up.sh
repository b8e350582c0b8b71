#!/usr/bin/env bash
# Ensure a Docker engine answers: install Debian's docker.io and start dockerd when needed.
# Harmless when an engine already runs.
set -euo pipefail
if docker info >/dev/null 2>&1; then exit 0; fi
export DEBIAN_FRONTEND=noninteractive
need=()
command -v dockerd >/dev/null || need+=(docker.io)
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v runsc >/dev/null || need+=(runsc)
if ((${#need[@]})); then
  echo "docker-up: installing ${need[*]}" >&2
  apt-get update -q >/dev/null
  apt-get install -y -q "${need[@]}" >/dev/null
fi
# A stale pid file from a killed session stops dockerd from starting ("pid file found").
if [[ -f /var/run/docker.pid ]] && ! pgrep -x dockerd >/dev/null; then rm -f /var/run/docker.pid; fi
if [[ -S /run/containerd/containerd.sock ]] && ! pgrep -x containerd >/dev/null; then rm -f /run/containerd/containerd.sock; fi
mkdir -p /etc/docker
if [[ ! -f /etc/docker/daemon.json ]] && command -v runsc >/dev/null; then
  cat >/etc/docker/daemon.json <<JSON
{"runtimes": {"runsc": {"path": "$(command -v runsc)", "runtimeArgs": ["--platform=ptrace", "--network=none", "--host-uds=open"]}}}
JSON
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
