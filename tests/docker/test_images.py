"""The offline image builder against a real engine: reuse, tags and what the image holds."""

from __future__ import annotations

import shutil
import time
import uuid
from pathlib import Path

import pytest

from supervisor.errors import ImageBuildFailed
from supervisor.images import (
    AGENT_IMAGE_REPO,
    BASE_IMAGE,
    agent_image_tag,
    agent_source_dir,
    ensure_images,
    preflight,
)
from supervisor.runtime.docker import DockerRuntime
from tests.docker.conftest import Sandboxes

pytestmark = [pytest.mark.docker, pytest.mark.timeout(120)]


def test_ensure_images_reuses_an_unchanged_tree(runtime: DockerRuntime, agent_image: str) -> None:
    """A second ensure_images on an unchanged tree builds nothing and returns the same tag."""
    lines: list[str] = []
    started = time.monotonic()
    assert ensure_images(runtime, progress=lines.append) == agent_image
    assert time.monotonic() - started < 10
    assert lines == [f"image {agent_image} is up to date"]


def test_built_tag_is_the_computed_tag(agent_image: str) -> None:
    """The built image's tag is what agent_image_tag() computes without building."""
    assert agent_image == agent_image_tag()
    assert agent_image.startswith(f"{AGENT_IMAGE_REPO}:")


def test_tag_follows_source_changes_only(tmp_path: Path) -> None:
    """Editing a source file changes the tag; bytecode caches do not."""
    source = tmp_path / "agent_image"
    shutil.copytree(agent_source_dir(), source, ignore=shutil.ignore_patterns("__pycache__"))
    tag = agent_image_tag(source)
    assert tag == agent_image_tag()
    (source / "__pycache__").mkdir()
    (source / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"\0")
    assert agent_image_tag(source) == tag
    with open(source / "__init__.py", "a") as init:
        init.write("\n# edited\n")
    assert agent_image_tag(source) != tag


def test_agent_image_contents(sandboxes: Sandboxes) -> None:
    """The image imports the engine's deps and agent_image, has massgen-run, and no wheels."""
    script = (
        "python3 -c 'import pydantic, yaml, openai, google.genai, agent_image' && "
        "test -x /usr/local/bin/massgen-run && test ! -e /build && test ! -e /wheels && "
        'echo "home=$HOME cwd=$(pwd)"'
    )
    info, out = sandboxes.run("sh", "-c", script)
    assert info.exit_code == 0, out
    assert "home=/tmp cwd=/workspace" in out


def test_preflight_clean_when_images_exist(runtime: DockerRuntime, agent_image: str) -> None:
    """preflight() reports nothing when the engine answers and the images are built."""
    assert preflight(runtime) == []


def test_preflight_explains_a_dead_engine(tmp_path: Path) -> None:
    """preflight() names the engine it tried and how to start one."""
    dead = DockerRuntime(environment={"DOCKER_HOST": f"unix://{tmp_path}/none.sock"}, timeout=5)
    problems = preflight(dead, cache=tmp_path)
    assert len(problems) == 1
    assert f"no container engine answers at unix://{tmp_path}/none.sock" in problems[0]
    assert ".ci/docker-up.sh" in problems[0]


def test_build_runs_without_network(runtime: DockerRuntime, agent_image: str, tmp_path: Path) -> None:
    """RUN steps of an image build see only the loopback interface."""
    (tmp_path / "Dockerfile").write_text(f'FROM {BASE_IMAGE}\nRUN test "$(ls /sys/class/net)" = lo\n')
    tag = f"massgen-sandbox/test-build:{uuid.uuid4().hex[:8]}"
    try:
        runtime.build_image(tmp_path, tag)
        assert runtime.image_exists(tag)
    finally:
        runtime.remove_image(tag, force=True)
    runtime.remove_image(tag)  # already gone: fine
    assert not runtime.image_exists(tag)


def test_failed_build_step_raises_with_output(runtime: DockerRuntime, agent_image: str, tmp_path: Path) -> None:
    """A failing RUN step raises ImageBuildFailed carrying the step's output."""
    (tmp_path / "Dockerfile").write_text(f"FROM {BASE_IMAGE}\nRUN echo marker-before-failure && false\n")
    tag = f"massgen-sandbox/test-build:{uuid.uuid4().hex[:8]}"
    with pytest.raises(ImageBuildFailed) as caught:
        runtime.build_image(tmp_path, tag)
    assert "marker-before-failure" in caught.value.log_tail
    assert not runtime.image_exists(tag)
