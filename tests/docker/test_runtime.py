"""DockerRuntime against a real engine and the built agent image: hardening and lifecycle."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from supervisor.errors import ImageMissing, SandboxStartFailed
from supervisor.runtime.base import LABEL_OWNER, LABEL_RUN, Mount
from supervisor.runtime.docker import DockerHandle, DockerRuntime
from tests.docker.conftest import LABEL_TEST, Sandboxes

pytestmark = [pytest.mark.docker, pytest.mark.timeout(120)]

FORK_BOMB = """
import subprocess
procs, refused = [], 0
for _ in range(1000):
    try:
        procs.append(subprocess.Popen(["sleep", "60"]))
    except OSError:
        refused += 1
print(f"started={len(procs)} refused={refused}", flush=True)
for p in procs:
    p.kill()
for p in procs:
    p.wait()
print("survived", flush=True)
"""


def _field(output: str, key: str) -> int:
    for part in output.split():
        if part.startswith(f"{key}="):
            return int(part.split("=", 1)[1])
    raise AssertionError(f"{key}= not in {output!r}")


def test_runs_as_non_root_user(sandboxes: Sandboxes) -> None:
    """The sandbox process runs as uid/gid 10001, never root."""
    info, out = sandboxes.run("id", "-u")
    assert info.exit_code == 0, out
    assert out.strip() == "10001"


def test_root_fs_read_only_and_tmp_writable(sandboxes: Sandboxes) -> None:
    """Writing under / fails (read-only root); /tmp is a writable nosuid,nodev tmpfs."""
    script = (
        "touch /probe 2>/dev/null && echo ROOT_WRITABLE; "
        "echo ok > /tmp/probe && cat /tmp/probe; grep ' /tmp ' /proc/mounts"
    )
    info, out = sandboxes.run("sh", "-c", script)
    assert info.exit_code == 0, out
    assert "ROOT_WRITABLE" not in out
    assert "ok" in out.splitlines()
    tmp_line = next(line for line in out.splitlines() if " /tmp " in line)
    assert tmp_line.startswith("tmpfs ")
    assert "nosuid" in tmp_line and "nodev" in tmp_line


def test_read_only_bind_mount_cannot_be_written(sandboxes: Sandboxes, tmp_path: Path) -> None:
    """A read-only bind mount is readable but not writable; a read-write one is writable."""
    ro = tmp_path / "context"
    rw = tmp_path / "workspace"
    ro.mkdir()
    rw.mkdir()
    (ro / "doc.txt").write_text("hello\n")
    ro.chmod(0o777)  # even mode 777 on the host must not make a read-only mount writable
    rw.chmod(0o777)
    script = (
        "cat /ctx/doc.txt; touch /ctx/new 2>/dev/null && echo RO_WRITABLE; "
        "echo out > /workspace/result.txt && echo RW_OK"
    )
    info, out = sandboxes.run(
        "sh",
        "-c",
        script,
        mounts=(Mount(ro, "/ctx", read_only=True), Mount(rw, "/workspace", read_only=False)),
    )
    assert info.exit_code == 0, out
    assert "hello" in out
    assert "RO_WRITABLE" not in out
    assert not (ro / "new").exists()
    assert "RW_OK" in out
    assert (rw / "result.txt").read_text() == "out\n"


def test_no_docker_socket(sandboxes: Sandboxes) -> None:
    """Neither /var/run/docker.sock nor /run/docker.sock exists inside the sandbox."""
    info, out = sandboxes.run("sh", "-c", "ls -la /var/run/docker.sock /run/docker.sock 2>&1; exit 0")
    assert info.exit_code == 0
    assert out.count("No such file or directory") == 2, out


def test_only_loopback_interface(sandboxes: Sandboxes) -> None:
    """With network "none" the only interface is lo."""
    info, out = sandboxes.run("ls", "/sys/class/net")
    assert info.exit_code == 0, out
    assert out.split() == ["lo"]


def test_no_effective_capabilities_and_no_new_privileges(sandboxes: Sandboxes) -> None:
    """CapEff and CapBnd are 0 and NoNewPrivs is set for the sandbox process."""
    info, out = sandboxes.run("grep", "-E", "^(CapEff|CapBnd|NoNewPrivs):", "/proc/self/status")
    assert info.exit_code == 0, out
    fields = dict(line.split(":\t") for line in out.strip().splitlines())
    assert int(fields["CapEff"], 16) == 0
    assert int(fields["CapBnd"], 16) == 0
    assert fields["NoNewPrivs"].strip() == "1"


def test_environment_comes_from_spec_only(sandboxes: Sandboxes, monkeypatch: pytest.MonkeyPatch) -> None:
    """The sandbox sees the spec's env and nothing from the supervisor's environment."""
    monkeypatch.setenv("MASSGEN_TEST_HOST_SECRET", "leaked")
    info, out = sandboxes.run("env", env={"MASSGEN_TEST_VISIBLE": "yes"})
    assert info.exit_code == 0, out
    assert "MASSGEN_TEST_VISIBLE=yes" in out
    assert "MASSGEN_TEST_HOST_SECRET" not in out
    assert "leaked" not in out


def test_fork_bomb_is_contained_by_pids_limit(sandboxes: Sandboxes) -> None:
    """1000 sleep processes hit pids_limit: forks are refused, the sandbox and host carry on."""
    info, out = sandboxes.run("python3", "-c", FORK_BOMB, pids_limit=64)
    assert info.exit_code == 0, out
    assert _field(out, "started") < 64
    assert _field(out, "refused") > 0
    assert "survived" in out
    assert subprocess.run(["true"], check=False).returncode == 0  # the host can still fork


def test_memory_hog_is_oom_killed(sandboxes: Sandboxes) -> None:
    """Allocating past the memory limit (no swap) ends the sandbox with oom_killed set."""
    hog = "chunks = []\nwhile True:\n    chunks.append(b'x' * (16 << 20))\n"
    info, out = sandboxes.run("python3", "-c", hog, memory_bytes=64 << 20)
    assert info.oom_killed, (info, out)
    assert info.exit_code == 137


def test_stop_kills_after_grace_when_sigterm_is_ignored(runtime: DockerRuntime, sandboxes: Sandboxes) -> None:
    """stop(grace) of a sandbox ignoring SIGTERM returns within grace+2 s, the sandbox exited."""
    handle = sandboxes.start("sh", "-c", "trap '' TERM; echo ready; while :; do sleep 1; done")
    sandboxes.wait_for_output(handle, "ready")
    grace = 2.0
    started = time.monotonic()
    runtime.stop(handle, grace)
    elapsed = time.monotonic() - started
    assert grace - 0.5 <= elapsed <= grace + 2, elapsed
    facts = runtime.facts(handle)
    assert facts.state == "exited"
    assert facts.exit_code == 137
    info = runtime.wait(handle, timeout=5)
    assert info is not None and info.exit_code == 137


def test_stop_is_prompt_when_the_process_obeys_sigterm(runtime: DockerRuntime, sandboxes: Sandboxes) -> None:
    """init forwards SIGTERM, so a cooperative process exits long before the grace ends."""
    handle = sandboxes.start("sleep", "600")
    assert runtime.wait(handle, timeout=0.3) is None
    started = time.monotonic()
    runtime.stop(handle, 10)
    assert time.monotonic() - started < 5
    info = runtime.wait(handle, timeout=5)
    assert info is not None and info.exit_code == 143  # 128 + SIGTERM


def test_wait_returns_none_while_running(runtime: DockerRuntime, sandboxes: Sandboxes) -> None:
    """wait(timeout) returns None after about `timeout` seconds while the sandbox runs."""
    handle = sandboxes.start("sleep", "600")
    started = time.monotonic()
    assert runtime.wait(handle, timeout=1.0) is None
    assert 0.8 <= time.monotonic() - started < 5
    assert runtime.wait(handle, timeout=0) is None
    runtime.kill(handle)
    info = runtime.wait(handle, timeout=10)
    assert info is not None and info.exit_code == 137 and not info.oom_killed


def test_labels_and_list_owned(runtime: DockerRuntime, sandboxes: Sandboxes) -> None:
    """The sandbox carries the spec's labels plus the owner label and list_owned finds it."""
    handle = sandboxes.start("sleep", "600")
    facts = runtime.facts(handle)
    assert facts.state == "running"
    assert facts.labels[LABEL_OWNER] == "1"
    assert facts.labels[LABEL_TEST] == sandboxes.test_id
    assert facts.labels[LABEL_RUN].startswith("test_")
    assert facts.runtime == "runc"
    assert facts.image == sandboxes.image
    owned = runtime.list_owned({LABEL_TEST: sandboxes.test_id})
    assert [f.id for f in owned] == [handle.id]
    assert runtime.list_owned({LABEL_TEST: "no-such-test"}) == []


def test_facts_with_stats_sample(runtime: DockerRuntime, sandboxes: Sandboxes, until: Callable[..., None]) -> None:
    """facts(stats=True) of a running sandbox reports memory, pids and a cpu percentage."""
    handle = sandboxes.start("sh", "-c", "sleep 600 & sleep 600 & wait")
    until(lambda: runtime.facts(handle).state == "running", what="running")
    facts = runtime.facts(handle, stats=True)
    assert facts.memory_bytes is not None and facts.memory_bytes > 0
    assert facts.pids is not None and facts.pids >= 3
    assert facts.cpu_percent is not None and facts.cpu_percent >= 0
    plain = runtime.facts(handle)
    assert plain.memory_bytes is None and plain.pids is None


def test_remove_twice_is_fine(runtime: DockerRuntime, sandboxes: Sandboxes) -> None:
    """remove() of a removed sandbox does nothing; facts then say "removed"."""
    handle = sandboxes.start("true")
    assert sandboxes.wait_exit(handle).exit_code == 0
    runtime.remove(handle)
    runtime.remove(handle)
    runtime.kill(handle)
    runtime.stop(handle, 1)
    assert runtime.facts(handle).state == "removed"
    assert runtime.logs(handle) == b""
    info = runtime.wait(handle, timeout=1)
    assert info is not None and info.error


def test_missing_image_raises_image_missing(runtime: DockerRuntime, sandboxes: Sandboxes) -> None:
    """Starting from an image that does not exist raises ImageMissing and pulls nothing."""
    with pytest.raises(ImageMissing):
        sandboxes.start("true", image="massgen-sandbox/does-not-exist:never")


def test_failed_start_leaves_no_container(runtime: DockerRuntime, sandboxes: Sandboxes) -> None:
    """A start the engine refuses raises SandboxStartFailed and leaves no container behind."""
    with pytest.raises(SandboxStartFailed, match="start"):
        sandboxes.start("true", workdir="/etc/passwd")  # created, then refused at start
    assert runtime.list_owned({LABEL_TEST: sandboxes.test_id}) == []


def test_missing_mount_source_raises_start_failed(runtime: DockerRuntime, sandboxes: Sandboxes, tmp_path: Path) -> None:
    """A bind mount whose host path does not exist is refused; the engine never creates it."""
    missing = tmp_path / "missing"
    with pytest.raises(SandboxStartFailed):
        sandboxes.start("true", mounts=(Mount(missing, "/ctx"),))
    assert not missing.exists()
    assert runtime.list_owned({LABEL_TEST: sandboxes.test_id}) == []


def test_unknown_runtime_raises_start_failed(runtime: DockerRuntime, sandboxes: Sandboxes) -> None:
    """An OCI runtime the engine does not know is a SandboxStartFailed, not a crash."""
    with pytest.raises(SandboxStartFailed):
        sandboxes.start("true", runtime="no-such-runtime")
    assert runtime.list_owned({LABEL_TEST: sandboxes.test_id}) == []


def test_runsc_runs_python(runtime: DockerRuntime, sandboxes: Sandboxes) -> None:
    """Under gVisor (runsc) the agent image runs `python3 -c pass` with the same hardening."""
    if "runsc" not in runtime.available_runtimes():
        if os.environ.get("MASSGEN_REQUIRE_DOCKER") == "1":
            pytest.fail("runsc is not registered with the engine (CI registers it in .ci/docker-up.sh)")
        pytest.skip("the engine has no runsc runtime registered")
    script = "python3 -c pass && id -u && dmesg | head -1"
    handle = sandboxes.start("sh", "-c", script, runtime="runsc")
    info = sandboxes.wait_exit(handle, timeout=90)
    out = runtime.logs(handle).decode(errors="replace")
    assert info.exit_code == 0, out
    assert "10001" in out.split()
    assert "gVisor" in out  # the guest kernel's boot log: really under runsc, not runc
    assert runtime.facts(handle).runtime == "runsc"


def test_unreachable_engine_raises_runtime_unavailable(tmp_path: Path) -> None:
    """A runtime pointed at a dead socket raises RuntimeUnavailable, not a docker exception."""
    from supervisor.errors import RuntimeUnavailable

    dead = DockerRuntime(environment={"DOCKER_HOST": f"unix://{tmp_path}/none.sock"}, timeout=5)
    with pytest.raises(RuntimeUnavailable):
        dead.ping()
    with pytest.raises(RuntimeUnavailable):
        dead.facts(DockerHandle("0" * 64))
