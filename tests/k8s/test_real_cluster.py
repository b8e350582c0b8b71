"""The same contract on a real cluster, opt-in: MASSGEN_K8S_KUBECONFIG names its kubeconfig.

Without it every test here is skipped, and the skip says so (the only skip of the suite; CI
never sets it, so nothing in CI depends on a cluster). What it needs there: the namespace
(MASSGEN_K8S_NAMESPACE, default `massgen`) with deploy/kubernetes/role.yaml's rights for the
kubeconfig's user, and the agent image pullable by the nodes (MASSGEN_K8S_TEST_IMAGE, default
the local agent image's tag, e.g. loaded with `kind load docker-image`). docs/kubernetes.md
lists what has been verified this way.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from supervisor.images import agent_image_tag
from supervisor.runtime.base import LABEL_RUN
from supervisor.runtime.kubernetes.runtime import KubernetesRuntime
from tests.cli_helpers import load, massgen_run, parse_lines, write_config

KUBECONFIG = os.environ.get("MASSGEN_K8S_KUBECONFIG", "")
pytestmark = pytest.mark.skipif(
    not KUBECONFIG,
    reason="MASSGEN_K8S_KUBECONFIG is not set: no real cluster given, so none of the real-cluster tests ran",
)


def _env(**extra: str) -> dict[str, str]:
    env = {
        "MASSGEN_K8S_KUBECONFIG": KUBECONFIG,
        "MASSGEN_K8S_NAMESPACE": os.environ.get("MASSGEN_K8S_NAMESPACE", "massgen"),
    }
    return {**env, **extra}


def _run(args: list[str], cwd: Path, **extra: str) -> tuple[int, str, str]:
    image = os.environ.get("MASSGEN_K8S_TEST_IMAGE") or agent_image_tag()
    p = massgen_run(
        ["--automation", "--sandbox", "docker", "--runtime", "kubernetes", "--image", image, *args],
        cwd,
        600,
        **_env(**extra),
    )
    return p.returncode, p.stdout, p.stderr


def _no_job_for(run_id: str) -> bool:
    rt = KubernetesRuntime(env=_env())
    end = time.monotonic() + 120
    while rt.list_owned({LABEL_RUN: run_id}) and time.monotonic() < end:
        time.sleep(1)
    return rt.list_owned({LABEL_RUN: run_id}) == []


def test_quickstart_on_a_real_cluster(tmp_path: Path) -> None:
    """Quickstart as a Job: exit 0 with the answer, the Job deleted after."""
    rc, out, err = _run(["--config", "@examples/quickstart", "What is 2+2?"], tmp_path)
    assert rc == 0, out + err
    f = parse_lines(out)
    assert "4" in Path(f["ANSWER_FILE"]).read_text()
    assert _no_job_for(f["RUN_ID"])


def test_timeout_on_a_real_cluster(tmp_path: Path) -> None:
    """A sleep past the whole-run timeout: exit 3, the Job deleted."""
    cfg = write_config(
        tmp_path,
        """\
        agents:
          - id: a
            backend: {type: scripted, steps: [{shell: "sleep 120", timeout: 300}, {answer: never}]}
        timeout_settings: {orchestrator_timeout_seconds: 10}
        """,
    )
    rc, out, err = _run(["--config", str(cfg), "q"], tmp_path)
    assert rc == 3, out + err
    assert _no_job_for(parse_lines(out)["RUN_ID"])


def test_bad_image_on_a_real_cluster(tmp_path: Path) -> None:
    """An image no node can pull: exit 2 start_failed with the pod's events, the Job deleted."""
    p = massgen_run(
        ["--automation", "--sandbox", "docker", "--runtime", "kubernetes", "--image", "massgen-sandbox/agent:no-such-tag",
         "--config", "@examples/quickstart", "q"],
        tmp_path,
        300,
        **_env(MASSGEN_K8S_START_TIMEOUT="30"),
    )  # fmt: skip
    assert p.returncode == 2, p.stdout + p.stderr
    f = parse_lines(p.stdout)
    assert load(Path(f["LOG_DIR"]) / "result.json")["reason"] == "start_failed"
    assert "events:" in (Path(f["LOG_DIR"]) / "massgen.log").read_text()
    assert _no_job_for(f["RUN_ID"])
