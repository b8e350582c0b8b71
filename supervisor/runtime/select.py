"""Which container runtime runs the sandboxes: `--runtime` or `MASSGEN_RUNTIME`.

- `docker` (default): the local engine (or `DOCKER_HOST`), sharing this host's filesystem
  (bind mounts).
- `remote-docker`: the engine `DOCKER_HOST` names (TLS by `DOCKER_TLS_VERIFY` and
  `DOCKER_CERT_PATH`), sharing nothing: every sandbox is linked through the run channel
  (docs/channel.md, docs/remote-docker.md).
- `kubernetes`: each run a batch/v1 Job in one namespace, linked through the run channel over
  pods/exec (docs/kubernetes.md). The cluster: MASSGEN_K8S_KUBECONFIG, else KUBECONFIG, else
  ~/.kube/config, else the in-cluster service account; the namespace: MASSGEN_K8S_NAMESPACE,
  else the kubeconfig context's (the pod's own in-cluster), else `massgen`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

RUNTIMES = ("docker", "remote-docker", "kubernetes")
DEFAULT = "docker"


def runtime_name(flag: str | None = None, env: Mapping[str, str] | None = None) -> str:
    """The runtime asked for: the flag, else $MASSGEN_RUNTIME, else docker.

    Raises:
        ValueError: an unknown name (the message lists the known ones).
    """
    env = os.environ if env is None else env
    name = flag or env.get("MASSGEN_RUNTIME") or DEFAULT
    if name not in RUNTIMES:
        raise ValueError(f"unknown runtime {name!r}: use one of {', '.join(RUNTIMES)}")
    return name


def make_runtime(name: str, env: Mapping[str, str] | None = None) -> Any:
    """A runtime object for `name` (nothing is contacted yet).

    Raises:
        ValueError: an unknown name.
    """
    env = os.environ if env is None else env
    if name == "docker":
        from .docker import DockerRuntime

        return DockerRuntime()
    if name == "remote-docker":
        # Usually a tcp:// engine on another host; the local socket works too (nothing is shared
        # even then, which is how the channel is tested against the local engine).
        from .docker import RemoteDockerRuntime

        return RemoteDockerRuntime()
    if name == "kubernetes":
        from .kubernetes.runtime import KubernetesRuntime

        return KubernetesRuntime(env=env)
    raise ValueError(f"unknown runtime {name!r}: use one of {', '.join(RUNTIMES)}")
