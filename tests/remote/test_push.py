"""`massgen-run image push` against the remote engine: streamed save/load over TLS, skip, clear errors."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from supervisor.images import agent_image_tag
from tests.remote import engine

pytestmark = pytest.mark.docker

CLI = str(Path(sys.executable).with_name("massgen-run"))


def _push(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return _push_measured(env, *args)[0]


# The CLI's own main under tracemalloc: the peak of everything Python allocated, so a push that
# held the tar (or any large part of it) in memory shows it, whatever the allocator does with
# freed memory (peak RSS also counts heap the allocator kept; it swung from 34 to 387 MB here
# for the same streaming code, depending on what ran before).
_TRACED = """
import sys, tracemalloc
tracemalloc.start()
from supervisor.cli import main
code = main(sys.argv[2:])
with open(sys.argv[1], "w") as fh:
    fh.write(str(tracemalloc.get_traced_memory()[1]))
sys.exit(code)
"""


def _push_measured(env: dict[str, str], *args: str) -> tuple[subprocess.CompletedProcess[str], int]:
    """Run the push (the CLI's main, in its own process); also return its Python heap's peak in bytes."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")} | env
    with tempfile.NamedTemporaryFile("r") as peak:
        proc = subprocess.run(
            [sys.executable, "-c", _TRACED, peak.name, "image", "push", *args],
            env=full,
            capture_output=True,
            text=True,
            timeout=600,
        )
        traced = peak.read()
    return proc, int(traced) if traced else -1


def _drop_remote(tag: str, env: dict[str, str]) -> None:
    client = engine.client_for(env)
    try:
        if engine.image_id(client, tag) is not None:
            client.images.remove(tag, force=True)
    finally:
        client.close()


def test_push_copies_the_agent_image_streaming_then_skips(remote_engine: dict[str, str]) -> None:
    """--to plus DOCKER_CERT_PATH/DOCKER_TLS_VERIFY: copied with the same id, without holding the tar; then skipped."""
    tag = agent_image_tag()
    _drop_remote(tag, remote_engine)
    cert_env = {"DOCKER_TLS_VERIFY": "1", "DOCKER_CERT_PATH": remote_engine["DOCKER_CERT_PATH"]}
    proc, peak = _push_measured(cert_env, "--to", remote_engine["DOCKER_HOST"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [tag]
    assert "copied in" in proc.stderr and "MiB sent" in proc.stderr
    client = engine.client_for(remote_engine)
    try:
        import docker

        local = docker.from_env(environment={})
        try:
            assert engine.image_id(client, tag) == engine.image_id(local, tag) is not None
        finally:
            local.close()
    finally:
        client.close()
    again, skip_peak = _push_measured(remote_engine)
    assert again.returncode == 0, again.stderr
    assert "skipped" in again.stderr
    # The image is ~280 MiB and goes through in 64 KiB pieces: the copy's peak is the skip's (the
    # same imports, no copy) plus a few MiB at most.
    assert skip_peak > 0 and peak - skip_peak < 8 << 20, (peak, skip_peak)


def test_push_to_an_unreachable_engine_is_a_clear_error(remote_engine: dict[str, str]) -> None:
    """Nothing listening at the target: exit 1 naming the target."""
    proc = _push(
        {}, "--to", f"tcp://{engine.HOST_ADDR}:9", "--tls-verify", "--cert-path", remote_engine["DOCKER_CERT_PATH"]
    )
    assert proc.returncode == 1
    assert f"target engine at tcp://{engine.HOST_ADDR}:9 does not answer" in proc.stderr


def test_push_without_a_client_cert_is_refused(remote_engine: dict[str, str], tmp_path: Path) -> None:
    """The engine verifies clients: a push with no certificate fails cleanly."""
    proc = _push({}, "--to", remote_engine["DOCKER_HOST"])
    assert proc.returncode == 1
    assert "does not answer" in proc.stderr


def test_push_of_a_missing_image_is_a_clear_error(remote_engine: dict[str, str]) -> None:
    """An image the source engine lacks: exit 1 naming it."""
    proc = _push(remote_engine, "massgen-sandbox/nosuch:0")
    assert proc.returncode == 1
    assert "image massgen-sandbox/nosuch:0 is not on" in proc.stderr
