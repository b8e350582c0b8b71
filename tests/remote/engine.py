"""A second, real Docker engine in its own network namespace, reached only over TLS on a veth pair.

This is the remote-docker test setup of issue 15: the engine shares no network with the host
(its only interface besides loopback is one end of a veth pair), listens on TCP only on the
namespace's address, verifies client certificates generated here, and keeps its own data root,
exec root, pid file and containerd. `python -m tests.remote.engine up|down|status|env` (or
`scripts/remote-engine.sh`) drives it; pytest uses the same functions (tests/remote/fixtures.py).

Facts this relies on (seen on Debian 12's docker.io 20.10):
- `ip netns exec` remounts /sys and dockerd then fails ("Devices cgroup isn't mounted"), so the
  engine is started with `nsenter --net=` only, keeping the host's mounts.
- dockerd uses a *system* containerd whenever /run/containerd/containerd.sock exists and starts its
  own otherwise; separate containerd namespaces keep the two engines apart in either case.
- a plain TCP listener makes dockerd sleep 15 s at start; with --tlsverify it does not.
- a stale pid file stops dockerd from starting.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import docker
import psutil

__all__ = [
    "ENGINE_ADDR",
    "NETNS",
    "EngineError",
    "Layout",
    "cut_link",
    "down",
    "engine_env",
    "host_paths_mounted",
    "leftovers",
    "link_is_up",
    "push_image",
    "restore_link",
    "status",
    "up",
    "wait_answers",
]

NETNS = os.environ.get("MASSGEN_REMOTE_NETNS", "massgen-remote")
HOST_IF = "mgremote0"  # interface names are at most 15 bytes
NS_IF = "mgremote1"
# A /30 in 10.201/16: far from Docker's default pools (172.17-31/16, 192.168/16) and from the
# host's own routes (checked at `up`).
HOST_ADDR = "10.201.0.1"
ENGINE_ADDR = "10.201.0.2"
PREFIX_LEN = 30
PORT = 2376  # docker's port for TLS
CONTAINERD_NAMESPACE = "massgen-remote"
START_TIMEOUT_S = 60.0
STOP_GRACE_S = 20.0
CERT_DAYS = 30


class EngineError(RuntimeError):
    """The remote engine could not be set up, reached or torn down; the message says what and why."""


@dataclass(frozen=True)
class Layout:
    """Where the remote engine keeps its state (everything `down` removes)."""

    state_dir: Path  # data root, certificates, daemon.json, log
    run_dir: Path  # exec root and pid file: short paths, containerd's unix sockets live below

    @classmethod
    def default(cls) -> Layout:
        return cls(
            Path(os.environ.get("MASSGEN_REMOTE_STATE_DIR", "/var/lib/massgen-remote")),
            Path(os.environ.get("MASSGEN_REMOTE_RUN_DIR", "/run/massgen-remote")),
        )

    @property
    def data_root(self) -> Path:
        return self.state_dir / "data"

    @property
    def exec_root(self) -> Path:
        return self.run_dir / "exec"

    @property
    def pidfile(self) -> Path:
        return self.run_dir / "dockerd.pid"

    @property
    def certs(self) -> Path:
        return self.state_dir / "certs"

    @property
    def client_certs(self) -> Path:
        """DOCKER_CERT_PATH for clients: ca.pem, cert.pem, key.pem."""
        return self.certs / "client"

    @property
    def server_certs(self) -> Path:
        return self.certs / "server"

    @property
    def config_file(self) -> Path:
        return self.state_dir / "daemon.json"

    @property
    def log_file(self) -> Path:
        return self.state_dir / "dockerd.log"

    @property
    def lock_file(self) -> Path:
        # Outside state_dir and run_dir so that `down` can remove both while holding it.
        return Path("/run/lock") / f"{NETNS}-engine.lock"


def engine_host() -> str:
    return f"tcp://{ENGINE_ADDR}:{PORT}"


def engine_env(layout: Layout | None = None) -> dict[str, str]:
    """What a docker client needs to reach the engine, in docker's own conventions."""
    layout = layout or Layout.default()
    return {
        "DOCKER_HOST": engine_host(),
        "DOCKER_TLS_VERIFY": "1",
        "DOCKER_CERT_PATH": str(layout.client_certs),
    }


# -- small helpers ----------------------------------------------------------------------------


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)
    if check and proc.returncode != 0:
        raise EngineError(f"ip {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def _netns_path() -> Path:
    return Path("/var/run/netns") / NETNS


def _netns_exists() -> bool:
    return NETNS in _ip("netns", "list").stdout.split()


def _link_exists(name: str) -> bool:
    return _ip("link", "show", "dev", name, check=False).returncode == 0


def link_is_up() -> bool:
    """Whether the host side of the veth pair is administratively up."""
    proc = _ip("-o", "link", "show", "dev", HOST_IF, check=False)
    return proc.returncode == 0 and "state DOWN" not in proc.stdout and ",UP" in proc.stdout


def _log_tail(layout: Layout, lines: int = 25) -> str:
    try:
        text = layout.log_file.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join("  " + line for line in text.splitlines()[-lines:])


@contextlib.contextmanager
def _locked(layout: Layout) -> Iterator[None]:
    # `.ci/run` and a pytest session may both bring the engine up or down; one at a time.
    layout.lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(layout.lock_file, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _cmdline(proc: psutil.Process) -> list[str]:
    try:
        return proc.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return []


def _pid_from_file(layout: Layout) -> int | None:
    try:
        return int(layout.pidfile.read_text().strip())
    except (OSError, ValueError):
        return None


def _our_dockerd(layout: Layout) -> psutil.Process | None:
    """The running dockerd of this layout (by pid file, confirmed by its exec root), else None."""
    pid = _pid_from_file(layout)
    if pid is None:
        return None
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
    except psutil.NoSuchProcess:
        return None
    argv = _cmdline(proc)
    if argv and Path(argv[0]).name == "dockerd" and f"--exec-root={layout.exec_root}" in argv:
        return proc
    return None


def _our_processes(layout: Layout) -> list[psutil.Process]:
    """dockerd, its containerd and shims: every process naming this layout's roots."""
    marks = (str(layout.exec_root), str(layout.data_root))
    found = []
    for proc in psutil.process_iter():
        argv = _cmdline(proc)
        if any(mark in arg for arg in argv for mark in marks):
            found.append(proc)
    return found


def _mounts_below(*roots: Path) -> list[str]:
    prefixes = [str(root) for root in roots]
    found = []
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            point = line.split()[1].replace("\\040", " ")
            if any(point == p or point.startswith(p + "/") for p in prefixes):
                found.append(point)
    return found


# -- certificates -----------------------------------------------------------------------------


def _write_certs(layout: Layout) -> None:
    """A CA, a server certificate for the engine's address and a client certificate, all fresh."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def cert_pem(cert: x509.Certificate) -> bytes:
        return cert.public_bytes(serialization.Encoding.PEM)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("massgen-remote test CA"))
        .issuer_name(name("massgen-remote test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CERT_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(common: str, usage: x509.ObjectIdentifier, sans: Sequence[x509.GeneralName]) -> tuple[bytes, bytes]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(common))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=CERT_DAYS))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
        return cert_pem(builder.sign(ca_key, hashes.SHA256())), key_pem(key)

    server = leaf(
        "massgen-remote engine",
        ExtendedKeyUsageOID.SERVER_AUTH,
        [x509.IPAddress(ipaddress.ip_address(ENGINE_ADDR)), x509.DNSName("massgen-remote")],
    )
    client = leaf("massgen-remote client", ExtendedKeyUsageOID.CLIENT_AUTH, [])
    files = {
        layout.certs / "ca-key.pem": key_pem(ca_key),
        layout.server_certs / "ca.pem": cert_pem(ca),
        layout.server_certs / "cert.pem": server[0],
        layout.server_certs / "key.pem": server[1],
        layout.client_certs / "ca.pem": cert_pem(ca),
        layout.client_certs / "cert.pem": client[0],
        layout.client_certs / "key.pem": client[1],
    }
    for path, data in files.items():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        path.write_bytes(data)
        path.chmod(0o600 if path.name.endswith("key.pem") else 0o644)


def _certs_complete(layout: Layout) -> bool:
    names = ("ca.pem", "cert.pem", "key.pem")
    return all((d / n).is_file() for d in (layout.server_certs, layout.client_certs) for n in names)


# -- network ----------------------------------------------------------------------------------


def _check_no_clash() -> None:
    ours = ipaddress.ip_network(f"{HOST_ADDR}/{PREFIX_LEN}", strict=False)
    for line in _ip("-o", "route", "show").stdout.splitlines():
        words = line.split()
        if not words or words[0] == "default":
            continue
        if "dev" in words and words[words.index("dev") + 1] == HOST_IF:
            continue
        try:
            other = ipaddress.ip_network(words[0], strict=False)
        except ValueError:
            continue
        if other.overlaps(ours):
            raise EngineError(f"route {line.strip()!r} overlaps {ours}; the remote engine needs that /30 to itself")


def _ensure_network() -> None:
    if not _netns_exists():
        _ip("netns", "add", NETNS)
    if not _link_exists(HOST_IF):
        _check_no_clash()
        _ip("link", "add", HOST_IF, "type", "veth", "peer", "name", NS_IF, "netns", NETNS)
    _ip("addr", "replace", f"{HOST_ADDR}/{PREFIX_LEN}", "dev", HOST_IF)
    _ip("link", "set", HOST_IF, "up")
    _ip("-n", NETNS, "addr", "replace", f"{ENGINE_ADDR}/{PREFIX_LEN}", "dev", NS_IF)
    _ip("-n", NETNS, "link", "set", NS_IF, "up")
    _ip("-n", NETNS, "link", "set", "lo", "up")


def cut_link() -> None:
    """Take the host side of the veth pair down: the engine becomes unreachable, nothing is reset."""
    _ip("link", "set", HOST_IF, "down")


def restore_link() -> None:
    """Bring the host side of the veth pair back up (its address and route come back with it)."""
    _ip("link", "set", HOST_IF, "up")
    # Link-down drops the connected route; `up` restores it, but make sure of the address.
    _ip("addr", "replace", f"{HOST_ADDR}/{PREFIX_LEN}", "dev", HOST_IF)


# -- the engine -------------------------------------------------------------------------------


API_VERSION = "1.41"  # Debian 12's dockerd 20.10


def client_for(env: dict[str, str], timeout: float = 30.0) -> docker.DockerClient:
    """A docker client for the engine `env` names, trusting only DOCKER_CERT_PATH's CA.

    requests lets REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE (set on this machine) replace the CA
    docker-py configures, and verification then fails; so the client ignores requests' env
    settings, and the API version is given so that no call is made before that.
    """
    import docker.utils

    client = docker.DockerClient(
        **docker.utils.kwargs_from_env(environment=env), version=API_VERSION, timeout=max(1, round(timeout))
    )
    client.api.trust_env = False
    return client


def _client(layout: Layout, timeout: float = 5.0) -> docker.DockerClient:
    return client_for(engine_env(layout), timeout)


def answers(layout: Layout | None = None, timeout: float = 3.0) -> bool:
    """Whether the engine answers a TLS ping with the generated client certificate."""
    import docker.errors
    import requests.exceptions

    layout = layout or Layout.default()
    if not _certs_complete(layout):
        return False
    try:
        client = _client(layout, timeout)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (docker.errors.DockerException, requests.exceptions.RequestException, OSError):
        return False


def wait_answers(layout: Layout | None = None, timeout: float = START_TIMEOUT_S) -> float:
    """Wait until the engine answers; returns the seconds waited.

    Raises:
        EngineError: it did not answer in time, or its dockerd exited meanwhile.
    """
    layout = layout or Layout.default()
    started = time.monotonic()
    deadline = started + timeout
    while not answers(layout, timeout=2.0):
        if _our_dockerd(layout) is None:
            raise EngineError(f"dockerd of {NETNS} is not running; its log ({layout.log_file}):\n{_log_tail(layout)}")
        if time.monotonic() > deadline:
            raise EngineError(
                f"engine at {engine_host()} did not answer within {timeout:.0f}s; log:\n{_log_tail(layout)}"
            )
        time.sleep(0.1)
    return time.monotonic() - started


def _daemon_config() -> dict[str, object]:
    # The same OCI runtimes as the host's engine (gVisor's runsc when registered), so that a
    # sandbox isolated with runsc locally is isolated the same way remotely.
    config: dict[str, object] = {}
    host = Path("/etc/docker/daemon.json")
    try:
        runtimes = json.loads(host.read_text() or "{}").get("runtimes")
    except (OSError, ValueError):
        runtimes = None
    if runtimes:
        config["runtimes"] = runtimes
    return config


def _start_dockerd(layout: Layout) -> None:
    dockerd = shutil.which("dockerd", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/bin"]))
    if dockerd is None:
        raise EngineError("dockerd not found; install Debian's docker.io (bash .ci/docker-up.sh does)")
    for path in (layout.data_root, layout.exec_root):
        path.mkdir(parents=True, exist_ok=True, mode=0o711)
    layout.config_file.write_text(json.dumps(_daemon_config()) + "\n")
    if layout.pidfile.exists():
        layout.pidfile.unlink()  # stale: _our_dockerd found no live engine behind it
    server = layout.server_certs
    argv = [
        "setsid",
        "--fork",  # the engine outlives this process and is reaped by init, never left a zombie
        "nsenter",
        f"--net={_netns_path()}",
        "--",
        dockerd,
        f"--config-file={layout.config_file}",
        f"--data-root={layout.data_root}",
        f"--exec-root={layout.exec_root}",
        f"--pidfile={layout.pidfile}",
        f"--host={engine_host()}",
        "--tlsverify",
        f"--tlscacert={server / 'ca.pem'}",
        f"--tlscert={server / 'cert.pem'}",
        f"--tlskey={server / 'key.pem'}",
        "--bridge=none",
        "--iptables=false",
        "--ip-masq=false",
        "--userland-proxy=false",
        f"--containerd-namespace={CONTAINERD_NAMESPACE}",
        f"--containerd-plugins-namespace={CONTAINERD_NAMESPACE}-plugins",
        "--shutdown-timeout=5",
    ]
    with open(layout.log_file, "ab") as log:
        subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, check=True, timeout=30)
    deadline = time.monotonic() + 10
    while _our_dockerd(layout) is None:
        if time.monotonic() > deadline:
            raise EngineError(f"dockerd did not write {layout.pidfile}; log:\n{_log_tail(layout)}")
        time.sleep(0.05)


def up(layout: Layout | None = None, *, say: bool = True) -> float:
    """Bring the engine up (or repair what is missing); returns the seconds its start took (0 if it ran).

    Raises:
        EngineError: a step failed; the message carries the tool's output or the engine's log.
    """
    layout = layout or Layout.default()
    if os.geteuid() != 0:
        raise EngineError("the remote engine needs root (network namespaces, veth, dockerd)")
    if shutil.which("ip") is None or shutil.which("nsenter") is None:
        raise EngineError("`ip` (iproute2) and `nsenter` (util-linux) are needed")
    with _locked(layout):
        _ensure_network()
        if _our_dockerd(layout) is not None and answers(layout):
            if say:
                print(f"remote-engine: already up at {engine_host()}", file=sys.stderr)
            return 0.0
        started = time.monotonic()
        if _our_dockerd(layout) is None:
            # Leftovers of a killed engine (containerd, shims, mounts) would collide with a new one.
            _stop_processes(layout)
            _unmount(layout)
            if not _certs_complete(layout):
                _write_certs(layout)
            _start_dockerd(layout)
        wait_answers(layout)
        took = time.monotonic() - started
        if say:
            print(f"remote-engine: up at {engine_host()} in {took:.1f}s (netns {NETNS})", file=sys.stderr)
        return took


def _terminate(procs: Sequence[psutil.Process], grace: float) -> None:
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(signal.SIGTERM)
    _gone, alive = psutil.wait_procs(procs, timeout=grace)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(alive, timeout=10)


def _stop_processes(layout: Layout) -> None:
    dockerd = _our_dockerd(layout)
    if dockerd is not None:
        _terminate([dockerd], STOP_GRACE_S)
    rest = [p for p in _our_processes(layout) if p.pid != os.getpid()]
    if rest:
        _terminate(rest, 5.0)


def _unmount(layout: Layout) -> None:
    for point in sorted(_mounts_below(layout.data_root, layout.exec_root), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, timeout=30, check=False)


def _remove_containers(layout: Layout) -> None:
    # Removing them through the API is quicker than dockerd's own stop at shutdown, and lets
    # the engine unmount their layers and network namespaces itself.
    if not answers(layout):
        return
    import docker.errors
    import requests.exceptions

    try:
        client = _client(layout, timeout=30)
        try:
            for container in client.containers.list(all=True):
                with contextlib.suppress(docker.errors.APIError):
                    container.remove(force=True)
        finally:
            client.close()
    except (docker.errors.DockerException, requests.exceptions.RequestException):
        pass


def leftovers(layout: Layout | None = None) -> list[str]:
    """Everything of the engine still present (namespace, veth, processes, mounts, files); [] when gone."""
    layout = layout or Layout.default()
    found = []
    if _netns_exists() or _netns_path().exists():
        found.append(f"network namespace {NETNS}")
    if _link_exists(HOST_IF):
        found.append(f"link {HOST_IF}")
    found += [f"process {p.pid} {' '.join(_cmdline(p))[:120]}" for p in _our_processes(layout) if p.pid != os.getpid()]
    found += [f"mount {point}" for point in _mounts_below(layout.data_root, layout.exec_root, _netns_path())]
    found += [f"path {path}" for path in (layout.pidfile, layout.run_dir, layout.state_dir) if path.exists()]
    return found


def down(layout: Layout | None = None, *, say: bool = True) -> None:
    """Stop the engine and remove its namespace, veth, mounts and files; harmless when already down.

    Raises:
        EngineError: something could not be removed (the message lists it).
    """
    layout = layout or Layout.default()
    with _locked(layout):
        _remove_containers(layout)
        _stop_processes(layout)
        _unmount(layout)
        if _link_exists(HOST_IF):
            _ip("link", "del", HOST_IF)
        if _netns_exists() or _netns_path().exists():
            _ip("netns", "del", NETNS)
        if not _mounts_below(layout.data_root, layout.exec_root):
            for path in (layout.run_dir, layout.state_dir):
                shutil.rmtree(path, ignore_errors=True)
        left = leftovers(layout)
    if left:
        raise EngineError("remote engine not fully removed: " + "; ".join(left))
    if say:
        print(f"remote-engine: down (netns {NETNS} removed)", file=sys.stderr)


def status(layout: Layout | None = None) -> dict[str, object]:
    """What is up: namespace, link, dockerd pid, whether it answers, and its images."""
    layout = layout or Layout.default()
    dockerd = _our_dockerd(layout)
    ok = dockerd is not None and answers(layout)
    images: list[str] = []
    if ok:
        client = _client(layout)
        try:
            images = sorted(tag for image in client.images.list() for tag in image.tags)
        finally:
            client.close()
    return {
        "netns": _netns_exists(),
        "link_up": link_is_up(),
        "dockerd_pid": dockerd.pid if dockerd else None,
        "answers": ok,
        "host": engine_host(),
        "images": images,
    }


def host_paths_mounted(container_id: str, env: dict[str, str] | None = None) -> list[str]:
    """The host paths bind-mounted into a container of the engine named by `env` ([] proves none).

    Volumes and tmpfs are fine: they live on the engine's side. Binds (in Mounts or in
    HostConfig.Binds) are paths of the engine's host, which a remote sandbox must never see.
    """
    client = client_for(env or engine_env())
    try:
        info = client.api.inspect_container(container_id)
    finally:
        client.close()
    found = [str(m.get("Source")) for m in info.get("Mounts") or [] if m.get("Type") == "bind"]
    found += [str(b).split(":", 1)[0] for b in (info.get("HostConfig") or {}).get("Binds") or []]
    return sorted(set(found))


def image_id(client: docker.DockerClient, tag: str) -> str | None:
    """The id of image `tag` on the engine of `client`, None when it has no such image."""
    import docker.errors

    try:
        info = client.api.inspect_image(tag)  # type: ignore[no-untyped-call]  # unannotated in types-docker
    except docker.errors.ImageNotFound:
        return None
    return str(info["Id"])


def push_image(tag: str, target: dict[str, str] | None = None, *, say: bool = True) -> float:
    """Copy image `tag` from the local engine to the remote one by a streamed save/load; returns seconds.

    Skipped (0.0) when the target already has the same image id. The tar is never held whole:
    the save stream's chunks are fed to the load request as they arrive.

    Raises:
        EngineError: the image is missing locally or the copy did not produce the same image id.
    """
    source = docker.from_env(timeout=600, environment={k: v for k, v in os.environ.items() if k != "DOCKER_HOST"})
    remote = client_for(target or engine_env(), timeout=600)
    try:
        local_id = image_id(source, tag)
        if local_id is None:
            raise EngineError(f"image {tag} is not on the local engine (massgen-run image build)")
        if image_id(remote, tag) == local_id:
            return 0.0
        started = time.monotonic()
        for _line in remote.api.load_image(source.api.get_image(tag)):  # type: ignore[no-untyped-call]  # unannotated in types-docker
            pass
        if image_id(remote, tag) != local_id:
            raise EngineError(f"pushed {tag} but the remote image id differs from {local_id}")
        took = time.monotonic() - started
        if say:
            print(f"remote-engine: pushed {tag} in {took:.1f}s", file=sys.stderr)
        return took
    finally:
        source.close()
        remote.close()


# -- command line -----------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Bring the remote engine up or down, show its status, or print its client environment."""
    parser = argparse.ArgumentParser(prog="scripts/remote-engine.sh", description=main.__doc__)
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("up", help="start it (idempotent: repairs what is missing)")
    sub.add_parser("down", help="stop it and remove everything it made (harmless when down)")
    sub.add_parser("status", help="print its state as JSON; exit 0 when it answers")
    push_cmd = sub.add_parser("push", help="copy an image (default: the agent image) to it by save/load")
    push_cmd.add_argument("image", nargs="?", default=None)
    env_cmd = sub.add_parser("env", help="print DOCKER_HOST, DOCKER_TLS_VERIFY, DOCKER_CERT_PATH")
    env_cmd.add_argument("--export", action="store_true", help="as `export K=V` lines for eval")
    args = parser.parse_args(argv)
    try:
        if args.action == "up":
            up()
        elif args.action == "down":
            down()
        elif args.action == "push":
            from supervisor.images import agent_image_tag

            push_image(args.image or agent_image_tag())
        elif args.action == "status":
            state = status()
            print(json.dumps(state, indent=2))
            return 0 if state["answers"] else 1
        else:
            prefix = "export " if args.export else ""
            for key, value in engine_env().items():
                print(f"{prefix}{key}={value}")
    except EngineError as exc:
        print(f"remote-engine: {args.action} failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
