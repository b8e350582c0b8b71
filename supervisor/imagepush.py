"""`massgen-run image push`: copy images to another engine offline, by a streamed save/load."""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

from supervisor.errors import ContainerRuntimeError, RuntimeUnavailable

__all__ = ["push_images", "target_environment"]

_PROGRESS_EVERY_BYTES = 64 << 20


def target_environment(
    to: str | None, tls_verify: bool, cert_path: str | None, env: dict[str, str] | None = None
) -> dict[str, str]:
    """The DOCKER_* environment of the target engine: flags first, then docker's own variables."""
    env = dict(os.environ if env is None else env)
    host = to or env.get("DOCKER_HOST")
    if not host:
        raise ValueError("no target engine: pass --to tcp://HOST:PORT or set DOCKER_HOST")
    out = {"DOCKER_HOST": host}
    if tls_verify or env.get("DOCKER_TLS_VERIFY"):
        out["DOCKER_TLS_VERIFY"] = "1"
    path = cert_path or env.get("DOCKER_CERT_PATH")
    if path:
        out["DOCKER_CERT_PATH"] = path
    return out


class _Progress:
    """Report the bytes sent every _PROGRESS_EVERY_BYTES."""

    def __init__(self, report: Callable[[int], None]) -> None:
        self._report = report
        self._shown = 0

    def __call__(self, sent: int) -> None:
        if sent - self._shown >= _PROGRESS_EVERY_BYTES:
            self._shown = sent
            self._report(sent)


def push_images(args: argparse.Namespace, err: Callable[[str], None], out: Callable[[str], None]) -> int:
    """Copy each image (default: the agent image) unless the target has the same id; 0 on success."""
    from supervisor.images import agent_image_tag
    from supervisor.runtime.docker import DockerRuntime

    what = "massgen-run image push"
    try:
        target_env = target_environment(args.to, args.tls_verify, args.cert_path)
    except ValueError as exc:
        err(f"{what}: {exc}")
        return 1
    source = DockerRuntime(environment={"DOCKER_HOST": args.source}, timeout=600)
    target = DockerRuntime(environment=target_env, timeout=600)
    for name, engine in (("source", source), ("target", target)):
        try:
            engine.ping()
        except ContainerRuntimeError as exc:
            err(f"{what}: the {name} engine at {engine.endpoint} does not answer: {exc}")
            return 1
    tags = list(args.images) or [agent_image_tag()]
    try:
        for tag in tags:
            local_id = source.image_id(tag)
            if local_id is None:
                err(f"{what}: image {tag} is not on {source.endpoint} (build it: massgen-run image build)")
                return 1
            if target.image_id(tag) == local_id:
                err(f"{what}: {tag} already on {target.endpoint} ({local_id[:19]}); skipped")
                out(tag)
                continue
            size = source.image_size(tag)
            err(f"{what}: copying {tag} ({size / (1 << 20):.0f} MiB) to {target.endpoint}")
            started = time.monotonic()
            source.copy_image_to(tag, target, _Progress(lambda sent: err(f"{what}: {sent / (1 << 20):.0f} MiB sent")))
            if target.image_id(tag) != local_id:
                err(f"{what}: {tag} loaded on {target.endpoint} but its id differs from {local_id}")
                return 2
            err(f"{what}: {tag} copied in {time.monotonic() - started:.1f}s")
            out(tag)
    except RuntimeUnavailable as exc:
        err(f"{what}: an engine stopped answering: {exc}")
        return 2
    except ContainerRuntimeError as exc:
        err(f"{what}: {exc}")
        return 2
    return 0
