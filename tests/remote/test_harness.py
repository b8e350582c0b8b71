"""The remote-engine harness itself: TLS only, the image pushed, a cuttable link, nothing left behind."""

from __future__ import annotations

import contextlib
import ssl
import subprocess
import time
import urllib.error
import urllib.request
import uuid

import docker.errors
import pytest

from supervisor.images import agent_image_tag
from tests.remote import engine

pytestmark = pytest.mark.docker


def test_engine_answers_over_tls_with_the_client_cert(remote_engine: dict[str, str]) -> None:
    """The engine answers the generated client certificate on its namespace address."""
    assert remote_engine["DOCKER_HOST"] == f"tcp://{engine.ENGINE_ADDR}:{engine.PORT}"
    client = engine.client_for(remote_engine)
    try:
        assert client.ping()
        assert client.info()["Name"]
    finally:
        client.close()


def test_engine_refuses_a_client_without_a_cert(remote_engine: dict[str, str]) -> None:
    """A TLS client that trusts the CA but presents no certificate is refused."""
    ctx = ssl.create_default_context(cafile=f"{remote_engine['DOCKER_CERT_PATH']}/ca.pem")
    url = f"https://{engine.ENGINE_ADDR}:{engine.PORT}/_ping"
    opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=ctx))
    with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionResetError)):
        opener.open(url, timeout=5).read()


def test_agent_image_present_after_push(remote_engine: dict[str, str], remote_agent_image: str) -> None:
    """After the push the remote engine has the agent image with the local image id; a second push is skipped."""
    import docker

    local = docker.from_env(environment={})
    remote = engine.client_for(remote_engine)
    try:
        assert engine.image_id(remote, remote_agent_image) == engine.image_id(local, remote_agent_image) is not None
    finally:
        local.close()
        remote.close()
    assert engine.push_image(remote_agent_image, remote_engine, say=False) == 0.0


def test_container_has_no_host_path_mounted(remote_engine: dict[str, str], remote_agent_image: str) -> None:
    """host_paths_mounted() is [] for a plain container and names the source of a bind."""
    client = engine.client_for(remote_engine)
    name = f"harness-{uuid.uuid4().hex[:8]}"
    try:
        plain = client.containers.create(remote_agent_image, ["true"], name=name, network_mode="none")
        bound = client.containers.create(
            remote_agent_image,
            ["true"],
            name=name + "b",
            network_mode="none",
            volumes={"/etc": {"bind": "/h", "mode": "ro"}},
        )
        assert engine.host_paths_mounted(str(plain.id), remote_engine) == []
        assert engine.host_paths_mounted(str(bound.id), remote_engine) == ["/etc"]
    finally:
        for n in (name, name + "b"):
            with contextlib.suppress(docker.errors.NotFound):
                client.containers.get(n).remove(force=True)
        client.close()


def test_cut_link_makes_engine_unreachable_and_restore_brings_it_back(remote_engine: dict[str, str]) -> None:
    """veth down on the host side: no answer; veth up: the engine answers again."""
    assert engine.answers()
    engine.cut_link()
    try:
        assert not engine.link_is_up()
        assert not engine.answers(timeout=2)
    finally:
        engine.restore_link()
    assert engine.link_is_up()
    assert engine.wait_answers(timeout=20) < 20


def test_down_leaves_nothing_and_up_twice_is_harmless(remote_engine: dict[str, str]) -> None:
    """down removes namespace, veth, processes, mounts and files; up twice works; the engine is back after."""
    engine.down(say=False)
    try:
        assert engine.leftovers() == []
        assert engine.NETNS not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert engine.HOST_IF not in subprocess.run(["ip", "link"], capture_output=True, text=True).stdout
        assert subprocess.run(["pgrep", "-f", "massgen-remote"], capture_output=True).returncode == 1
        engine.down(say=False)  # harmless when down
    finally:
        started = time.monotonic()
        engine.up(say=False)
        assert engine.up(say=False) == 0.0
        assert time.monotonic() - started < engine.START_TIMEOUT_S
        # down dropped the data root: later tests of the session need the agent image again.
        engine.push_image(agent_image_tag(), say=False)
    assert engine.answers()
