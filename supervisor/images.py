"""Offline image builder: a debootstrapped Debian base, a host-built wheelhouse, the agent image."""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

from supervisor.errors import BuildError, ContainerRuntimeError, ImageBuildFailed, RuntimeUnavailable

__all__ = [
    "AGENT_IMAGE_REPO",
    "BASE_IMAGE",
    "BuildError",
    "ImageStore",
    "agent_image_tag",
    "cache_dir",
    "ensure_images",
    "main",
    "preflight",
]

AGENT_IMAGE_REPO = "massgen-sandbox/agent"
BASE_IMAGE = "massgen-sandbox/base:bookworm"
DEBIAN_SUITE = "bookworm"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
BASE_PACKAGES = ("python3", "python3-pip", "ca-certificates", "procps")
MIN_FREE_BYTES = 2 << 30
LABEL_RECIPE = "io.massgen.image-recipe"

_DEBOOTSTRAP_TIMEOUT = 1800.0
_PIP_TIMEOUT = 1800.0
# Files in the agent_image/ tree that never reach the image nor its tag.
_SKIP_DIRS = frozenset({"__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache"})
_SKIP_SUFFIXES = (".pyc", ".pyo")

Progress = Callable[[str], None]


class ImageStore(Protocol):
    """What the builder needs from the engine (DockerRuntime provides it; tests may fake it)."""

    def ping(self) -> None: ...

    def image_labels(self, tag: str) -> dict[str, str] | None: ...

    def import_rootfs(self, tar_path: Path, tag: str, changes: Sequence[str] = ()) -> None: ...

    def build_image(
        self,
        context_dir: Path,
        tag: str,
        buildargs: Mapping[str, str] | None = None,
        dockerfile: str = "Dockerfile",
        *,
        nocache: bool = False,
        labels: Mapping[str, str] | None = None,
        on_line: Callable[[str], None] | None = None,
        timeout: float = 1800.0,
    ) -> str: ...


# -- locations and tags ---------------------------------------------------------------------


def cache_dir() -> Path:
    """`$MASSGEN_CACHE_DIR`, else `~/.cache/massgen-sandbox` (created on demand, never required)."""
    configured = os.environ.get("MASSGEN_CACHE_DIR")
    return Path(configured) if configured else Path.home() / ".cache" / "massgen-sandbox"


def agent_source_dir() -> Path:
    """The agent_image/ package directory (holding Dockerfile and requirements.txt).

    Raises:
        BuildError: the package or its Dockerfile cannot be found.
    """
    spec = importlib.util.find_spec("agent_image")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = Path(location)
        if (candidate / "Dockerfile").is_file():
            return candidate
    raise BuildError(
        f"agent_image/Dockerfile not found (searched {locations or 'no agent_image package'}); "
        "install the project from its source tree (pip install -e .)"
    )


def _base_recipe() -> str:
    """Hash of everything that decides the base image's content."""
    recipe = "\n".join(["minbase", DEBIAN_SUITE, _mirror(), *BASE_PACKAGES, *_base_changes(include_label=False)])
    return hashlib.sha256(recipe.encode()).hexdigest()[:12]


def _mirror() -> str:
    return os.environ.get("MASSGEN_DEBIAN_MIRROR", DEBIAN_MIRROR)


def _base_changes(*, include_label: bool = True) -> list[str]:
    changes = [
        "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "ENV LANG=C.UTF-8",
        'CMD ["/bin/bash"]',
    ]
    if include_label:
        changes.append(f"LABEL {LABEL_RECIPE}={_base_recipe()}")
    return changes


def _source_files(source: Path) -> list[Path]:
    files = []
    for root, dirs, names in os.walk(source):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.endswith(".egg-info"))
        for name in sorted(names):
            if not name.endswith(_SKIP_SUFFIXES):
                files.append(Path(root) / name)
    return files


def agent_image_tag(source: Path | None = None) -> str:
    """The agent image tag for the current agent_image/ tree, without building anything.

    The tag is a short hash of every source file (Dockerfile and requirements.txt included)
    and of the base image recipe, so any change gives a new tag and an unchanged tree reuses
    the image.

    Raises:
        BuildError: agent_image/ cannot be found.
    """
    source = source or agent_source_dir()
    digest = hashlib.sha256(f"base={BASE_IMAGE}@{_base_recipe()}\n".encode())
    for path in _source_files(source):
        digest.update(path.relative_to(source).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return f"{AGENT_IMAGE_REPO}:{digest.hexdigest()[:12]}"


# -- preflight --------------------------------------------------------------------------------


def _debootstrap_path() -> str | None:
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    return shutil.which("debootstrap", path=search)


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def _rootfs_tarball(cache: Path) -> Path:
    return cache / "rootfs" / f"debian-{DEBIAN_SUITE}-minbase-{_base_recipe()}.tar"


def preflight(runtime: ImageStore | None = None, *, cache: Path | None = None) -> list[str]:
    """Problems that would stop `ensure_images`, as precise human-readable lines; [] if none."""
    cache = cache or cache_dir()
    problems: list[str] = []
    engine_up = False
    base_needed = False
    if runtime is None:
        from supervisor.runtime.docker import DockerRuntime  # the one module importing docker

        runtime = DockerRuntime.from_env(timeout=10)
    try:
        runtime.ping()
        engine_up = True
    except ContainerRuntimeError as exc:
        where = getattr(runtime, "endpoint", None) or "the configured engine"
        problems.append(
            f"no container engine answers at {where} ({exc}); start one with "
            "`sudo bash .ci/docker-up.sh` (installs Debian's docker.io and starts dockerd) "
            "or `sudo systemctl start docker`, or point DOCKER_HOST at a running engine"
        )
    if engine_up:
        try:
            if runtime.image_labels(agent_image_tag()) is not None:
                return problems  # nothing to build
            base_needed = not _base_is_current(runtime)
        except (ContainerRuntimeError, BuildError) as exc:
            problems.append(f"cannot inspect images: {exc}")
            base_needed = False
        if base_needed and not _rootfs_tarball(cache).is_file():
            if _debootstrap_path() is None:
                problems.append(
                    f"image {BASE_IMAGE} is missing and building it needs debootstrap, which is "
                    "not installed; install it with `sudo apt-get install debootstrap`"
                )
            elif os.geteuid() != 0:
                problems.append(
                    f"image {BASE_IMAGE} is missing and debootstrap must run as root to build "
                    "it; run the image build as root once (e.g. `sudo massgen-run image build`)"
                )
    anchor = _existing_ancestor(cache)
    free = shutil.disk_usage(anchor).free
    if free < MIN_FREE_BYTES:
        problems.append(
            f"only {free / (1 << 30):.1f} GiB free at {anchor} (cache dir {cache}); the image "
            f"build needs about {MIN_FREE_BYTES / (1 << 30):.0f} GiB; free space or set "
            "MASSGEN_CACHE_DIR to a larger disk"
        )
    return problems


# -- building ---------------------------------------------------------------------------------


def ensure_images(runtime: ImageStore, *, progress: Progress, force: bool = False) -> str:
    """Build whatever is missing of the base and agent images; return the agent image tag.

    With `force`, everything is rebuilt from scratch: a fresh debootstrap, a fresh wheelhouse
    and an uncached agent build.

    Raises:
        BuildError: a step failed (the detail names it and carries the tool's last output).
        RuntimeUnavailable: the engine cannot be reached.
    """
    source = agent_source_dir()
    tag = agent_image_tag(source)
    if not force and _exists(runtime, tag):
        progress(f"image {tag} is up to date")  # no cache dir needed: it may not be writable
        return tag
    cache = cache_dir()
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BuildError(f"cannot create cache dir {cache}: {exc}") from exc
    with _build_lock(cache, progress):
        try:
            if not force and runtime.image_labels(tag) is not None:
                progress(f"image {tag} was built meanwhile")
                return tag
            _ensure_base(runtime, cache, progress, force=force)
            wheels = _ensure_wheelhouse(source, cache, progress, force=force)
            _build_agent(runtime, source, wheels, tag, progress, force=force)
        except RuntimeUnavailable:
            raise
        except ContainerRuntimeError as exc:
            tail = exc.log_tail.strip().splitlines()[-15:] if isinstance(exc, ImageBuildFailed) else []
            detail = str(exc) + "".join(f"\n  {line}" for line in tail)
            raise BuildError(detail) from exc
    return tag


def _exists(runtime: ImageStore, tag: str) -> bool:
    try:
        return runtime.image_labels(tag) is not None
    except RuntimeUnavailable:
        raise
    except ContainerRuntimeError as exc:
        raise BuildError(str(exc)) from exc


@contextmanager
def _build_lock(cache: Path, progress: Progress) -> Iterator[None]:
    # Two builders at once (daemon and CLI, parallel CI jobs) would debootstrap twice and race
    # on the wheelhouse; the second waits and then finds everything built.
    with open(cache / "build.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress(f"waiting for another image build to finish (lock {cache / 'build.lock'})")
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _base_is_current(runtime: ImageStore) -> bool:
    labels = runtime.image_labels(BASE_IMAGE)
    return labels is not None and labels.get(LABEL_RECIPE) == _base_recipe()


def _ensure_base(runtime: ImageStore, cache: Path, progress: Progress, *, force: bool) -> None:
    if not force and _base_is_current(runtime):
        progress(f"image {BASE_IMAGE} is up to date")
        return
    tarball = _rootfs_tarball(cache)
    if force or not tarball.is_file():
        _debootstrap(tarball, progress)
    else:
        progress(f"using cached root filesystem {tarball}")
    progress(f"importing {tarball.name} as {BASE_IMAGE}")
    runtime.import_rootfs(tarball, BASE_IMAGE, _base_changes())


def _debootstrap(tarball: Path, progress: Progress) -> None:
    debootstrap = _debootstrap_path()
    if debootstrap is None:
        raise BuildError("debootstrap not found; install it with `sudo apt-get install debootstrap`")
    if os.geteuid() != 0:
        raise BuildError("debootstrap must run as root to build the base image")
    tarball.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="debootstrap-", dir=tarball.parent))
    target = work / "rootfs"
    try:
        progress(f"debootstrap {DEBIAN_SUITE} from {_mirror()} (takes a minute or more)")
        cmd = [
            debootstrap,
            "--variant=minbase",
            f"--include={','.join(BASE_PACKAGES)}",
            DEBIAN_SUITE,
            str(target),
            _mirror(),
        ]
        _run(cmd, "debootstrap", progress, _debootstrap_phase(), _DEBOOTSTRAP_TIMEOUT)
        _unmount_below(target)
        # Package caches are a third of the tree and useless offline.
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for entry in (target / junk).glob("*"):
                if entry.is_file() and entry.name != "lock":
                    entry.unlink()
        partial = tarball.with_suffix(".tar.partial")
        progress(f"packing the root filesystem into {tarball}")
        _run(
            [
                "tar",
                "--numeric-owner",
                "--one-file-system",
                "-C",
                str(target),
                "-cf",
                str(partial),
                ".",
            ],
            "tar",
            progress,
            lambda _line: None,
            600.0,
        )
        os.replace(partial, tarball)
        progress(f"root filesystem ready in {time.monotonic() - started:.0f}s")
    finally:
        _safe_rmtree(work)


def _debootstrap_phase() -> Callable[[str], str | None]:
    """Show each debootstrap phase once instead of one line per package."""
    seen: set[str] = set()

    def summarize(line: str) -> str | None:
        if line.startswith(("W: ", "E: ")):
            return f"debootstrap: {line}"
        if not line.startswith("I: "):
            return None
        words = line[3:].split()
        phase = words[0] if words else ""
        if phase in seen:
            return None
        seen.add(phase)
        return f"debootstrap: {line[3:]}"

    return summarize


def _mounts_below(path: Path) -> list[str]:
    prefix = str(path.resolve())
    found = []
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            point = line.split()[1].replace("\\040", " ")
            if point == prefix or point.startswith(prefix + "/"):
                found.append(point)
    return found


def _unmount_below(path: Path) -> None:
    # A debootstrap that dies mid-way can leave /proc, /sys or a bind of the host's /dev
    # mounted inside the target; deleting through such a mount would delete host files.
    for point in sorted(_mounts_below(path), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], check=False, capture_output=True, timeout=60)
    remaining = _mounts_below(path)
    if remaining:
        raise BuildError(f"cannot unmount {remaining} below {path}; remove it by hand")


def _safe_rmtree(path: Path) -> None:
    if not path.exists():
        return
    try:
        _unmount_below(path)
    except BuildError:
        return  # leave it in place rather than delete through a mount
    shutil.rmtree(path, ignore_errors=True)


def _wheel_python() -> str:
    return os.environ.get("MASSGEN_WHEEL_PYTHON", sys.executable)


def _ensure_wheelhouse(source: Path, cache: Path, progress: Progress, *, force: bool) -> Path:
    requirements = source / "requirements.txt"
    if not requirements.is_file():
        raise BuildError(f"{requirements} not found")
    python = _wheel_python()
    probe = subprocess.run(
        [
            python,
            "-c",
            "import platform,sys; print(sys.implementation.name, '%d.%d' % sys.version_info[:2], platform.machine())",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    interp = probe.stdout.strip()
    if not interp.startswith("cpython 3.11 "):
        raise BuildError(
            f"wheels must be built by CPython 3.11 (Debian 12's python3); {python} is "
            f"{interp or 'unusable'}; set MASSGEN_WHEEL_PYTHON to a python3.11"
        )
    stamp_value = hashlib.sha256(requirements.read_bytes() + interp.encode()).hexdigest()
    wheels = cache / "wheels"
    stamp = wheels / ".stamp"
    if not force and stamp.is_file() and stamp.read_text().strip() == stamp_value:
        progress(f"using cached wheelhouse {wheels}")
        return wheels
    progress(f"building the wheelhouse from {requirements.name} with {python}")
    fresh = Path(tempfile.mkdtemp(prefix="wheels-", dir=cache))
    try:
        cmd = [
            python,
            "-m",
            "pip",
            "wheel",
            "--disable-pip-version-check",
            "--progress-bar",
            "off",
            "--prefer-binary",
            "--wheel-dir",
            str(fresh),
            "-r",
            str(requirements),
        ]
        if wheels.is_dir() and not force:
            cmd[4:4] = ["--find-links", str(wheels)]
        _run(cmd, "pip wheel", progress, _pip_summary, _PIP_TIMEOUT)
        count = len(list(fresh.glob("*.whl")))
        size = sum(p.stat().st_size for p in fresh.glob("*.whl"))
        (fresh / ".stamp").write_text(stamp_value + "\n")
        fresh.chmod(0o755)
        # Swap in the new set whole so stale versions never linger in the build context.
        old = cache / f"wheels.old-{os.getpid()}"
        if wheels.exists():
            os.replace(wheels, old)
        os.replace(fresh, wheels)
        shutil.rmtree(old, ignore_errors=True)
        progress(f"wheelhouse ready: {count} wheels, {size / (1 << 20):.0f} MiB")
    finally:
        shutil.rmtree(fresh, ignore_errors=True)
    return wheels


def _pip_summary(line: str) -> str | None:
    # Warnings are mostly about local find-links of the host's pip config; the tail of the
    # output is reported anyway when pip fails.
    if line.startswith("ERROR"):
        return f"pip: {line}"
    return None


def _build_agent(runtime: ImageStore, source: Path, wheels: Path, tag: str, progress: Progress, *, force: bool) -> None:
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="agent-build-") as tmp:
        context = Path(tmp)
        for path in _source_files(source):
            dest = context / "agent_image" / path.relative_to(source)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dest)
        shutil.copy2(source / "Dockerfile", context / "Dockerfile")
        shutil.copy2(source / "requirements.txt", context / "requirements.txt")
        (context / "wheels").mkdir()
        for wheel in wheels.glob("*.whl"):
            _link_or_copy(wheel, context / "wheels" / wheel.name)
        progress(f"building {tag} from {BASE_IMAGE} (network off)")

        def on_line(line: str) -> None:
            if line.startswith("Step "):
                step = " ".join(line.split())
                progress(f"build: {step[:96] + '...' if len(step) > 99 else step}")

        runtime.build_image(
            context,
            tag,
            {"BASE_IMAGE": BASE_IMAGE},
            "Dockerfile",
            nocache=force,
            labels={LABEL_RECIPE: tag.rpartition(":")[2]},
            on_line=on_line,
        )
    progress(f"image {tag} built in {time.monotonic() - started:.0f}s")


def _link_or_copy(src: Path, dest: Path) -> None:
    try:
        os.link(src, dest)
    except OSError:
        shutil.copy2(src, dest)


def _run(
    cmd: list[str],
    what: str,
    progress: Progress,
    summarize: Callable[[str], str | None],
    timeout: float,
) -> None:
    """Run `cmd`, passing summarized output to `progress`; BuildError with the tail on failure."""
    tail: list[str] = []
    try:
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            errors="replace",
        )
    except OSError as exc:
        raise BuildError(f"{what}: cannot run {cmd[0]}: {exc}") from exc
    timed_out = threading.Event()

    def expire() -> None:
        timed_out.set()
        proc.kill()

    timer = threading.Timer(timeout, expire)
    timer.start()
    try:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.rstrip()
            tail.append(line)
            del tail[:-30]
            shown = summarize(line)
            if shown:
                progress(shown)
        code = proc.wait()
    finally:
        timer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if timed_out.is_set():
        raise BuildError(f"{what} did not finish within {timeout:.0f}s")
    if code != 0:
        joined = "\n  ".join(tail[-15:])
        raise BuildError(f"{what} exited with {code}; last output:\n  {joined}")


# -- command line -----------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Build the images: progress on stderr, the agent image tag on stdout."""
    parser = argparse.ArgumentParser(prog="python -m supervisor.images", description=main.__doc__)
    parser.add_argument("--force", action="store_true", help="rebuild everything from scratch")
    args = parser.parse_args(argv)

    from supervisor.runtime.docker import DockerRuntime

    def progress(line: str) -> None:
        print(f"image: {line}", file=sys.stderr, flush=True)

    runtime = DockerRuntime.from_env()
    problems = preflight(runtime)
    if problems:
        for problem in problems:
            print(f"image: problem: {problem}", file=sys.stderr)
        return 1
    try:
        tag = ensure_images(runtime, progress=progress, force=args.force)
    except (BuildError, ContainerRuntimeError) as exc:
        print(f"image: FAILED: {exc}", file=sys.stderr)
        return 1
    print(tag)
    return 0


if __name__ == "__main__":
    sys.exit(main())
