"""Grading one attempt: answer and run assertions on the host, `command:` graders in a fresh container.

A `command:` grader never runs on the host and never sees the live log dir or workspace: the
answer and the winner's workspace are copied (without following symlinks) into a folder of the
batch, which is mounted read-only into a new hardened container with no network.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import SnapshotError
from ..runtime.base import LABEL_OWNER, LABEL_RUN, LABEL_SUPERVISOR, Mount, SandboxSpec
from ..snapshot import snapshot_dir
from .assertions import Outcome, RunFacts, check

log = logging.getLogger(__name__)

GRADE_IN_SANDBOX = "/grade"
GRADER_UID = 10001
MAX_GRADER_LOG_BYTES = 4000
GRADER_COPY_LIMIT_BYTES = 64 << 20


@dataclass
class GradeContext:
    """What a command grader needs besides the facts."""

    runtime: Any  # a Runtime, or None when no engine is reachable
    image: str | None
    grader_label: str  # io.massgen.supervisor-id of grader containers (never a run's)
    work_dir: Path  # <batch_dir>/grading
    rubric: Any = None  # a RubricGrader, made on first use of an llm_rubric


def _copy_for_grader(facts: RunFacts, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "answer.txt").write_text(facts.answer or "", encoding="utf-8")
    log_dir = Path(facts.log_dir)
    ws_root = log_dir.parent.parent / "workspaces" / log_dir.name
    if facts.winner and (ws_root / facts.winner).is_dir():
        try:
            snapshot_dir(ws_root, facts.winner, dest / "workspace", limit_bytes=GRADER_COPY_LIMIT_BYTES)
        except SnapshotError as exc:
            log.warning("grader copy of %s incomplete: %s", ws_root, exc)
    else:
        (dest / "workspace").mkdir(exist_ok=True)
    for dirpath, dirnames, filenames in os.walk(dest):
        for d in dirnames:
            os.chmod(os.path.join(dirpath, d), 0o555)  # noqa: S103 - read-only for everyone, on purpose
        for f in filenames:
            os.chmod(os.path.join(dirpath, f), 0o444)
    os.chmod(dest, 0o555)  # noqa: S103 - read-only for everyone, on purpose


def _run_grader(ctx: GradeContext, a: Any, copy: Path, env: dict[str, str], name: str) -> Outcome:
    runtime = ctx.runtime
    if runtime is None or not ctx.image:
        return Outcome("command", False, "no container engine for the command grader")
    spec = SandboxSpec(
        run_id=name,
        image=ctx.image,
        command=("sh", "-c", a.run),
        mounts=(Mount(copy, GRADE_IN_SANDBOX, read_only=True),),
        env=env,
        labels={LABEL_OWNER: "1", LABEL_SUPERVISOR: ctx.grader_label, LABEL_RUN: name},
        workdir=GRADE_IN_SANDBOX,
        user=f"{GRADER_UID}:{GRADER_UID}" if os.getuid() == 0 else f"{os.getuid()}:{os.getgid()}",
        memory_bytes=_size(a.memory),
        nano_cpus=1_000_000_000,
        pids_limit=128,
        network="none",
        tmpfs_bytes=64 << 20,
    )
    t0 = time.monotonic()
    handle = runtime.start(spec)
    try:
        info = runtime.wait(handle, a.timeout_s)
        if info is None:
            runtime.kill(handle)
            return Outcome("command", False, f"grader timed out after {a.timeout_s:g}s")
        out = runtime.logs(handle).decode("utf-8", "replace").strip()
        tail = out[-MAX_GRADER_LOG_BYTES:]
        dt = time.monotonic() - t0
        if info.oom_killed:
            return Outcome("command", False, "grader ran out of memory")
        ok = info.exit_code == 0
        return Outcome("command", ok, f"exit {info.exit_code} in {dt:.1f}s" + (f": {tail}" if tail else ""))
    finally:
        with contextlib.suppress(Exception):
            runtime.remove(handle)


def _size(text: str) -> int:
    from agent_image.protocol.config import parse_size

    return parse_size(text)


async def grade(
    assertions: list[Any], facts: RunFacts, expected: Any, question: str, ctx: GradeContext, item_id: str
) -> list[Outcome]:
    """Every assertion in order; command graders after the cheap ones, each in its own container."""
    out: list[Outcome] = []
    commands = []
    for a in assertions:
        if a.type == "command":
            commands.append(a)
        elif a.type == "llm_rubric":
            out.append(await ctx.rubric.grade(a, facts, question, expected, item_id))
        else:
            out.append(check(a, facts, expected))
    if not commands:
        return out
    copy = ctx.work_dir / item_id / facts.run_id
    if copy.exists():
        await asyncio.to_thread(_rmtree, copy)
    await asyncio.to_thread(_copy_for_grader, facts, copy)
    env = {
        "ANSWER_FILE": f"{GRADE_IN_SANDBOX}/answer.txt",
        "WORKSPACE": f"{GRADE_IN_SANDBOX}/workspace",
        "QUESTION": question,
        "EXPECTED": expected if isinstance(expected, str) else json.dumps(expected),
        "WINNER": facts.winner or "",
        "HOME": "/tmp",  # noqa: S108 - a grading command's HOME inside its own sandbox
    }
    for i, a in enumerate(commands):
        name = f"grade-{item_id}-{i}-{os.urandom(3).hex()}"
        try:
            out.append(await asyncio.to_thread(_run_grader, ctx, a, copy, env, name))
        except Exception as exc:  # noqa: BLE001 - a grader the engine could not start fails that assertion, named
            out.append(Outcome("command", False, f"grader could not run: {type(exc).__name__}: {exc}"[:300]))
    return out


def _rmtree(path: Path) -> None:
    for dirpath, dirnames, _files in os.walk(path):
        for d in dirnames:
            with contextlib.suppress(OSError):
                os.chmod(os.path.join(dirpath, d), 0o755)  # noqa: S103 - writable again, to be removed
    with contextlib.suppress(OSError):
        os.chmod(path, 0o755)  # noqa: S103 - writable again, to be removed
    shutil.rmtree(path, ignore_errors=True)


def reap_graders(runtime: Any, label: str) -> int:
    """Remove grader containers a killed batch left behind."""
    n = 0
    for facts in runtime.list_owned({LABEL_SUPERVISOR: label}):
        handle = type("Handle", (), {"id": facts.id})()
        with contextlib.suppress(Exception):
            runtime.kill(handle)
        with contextlib.suppress(Exception):
            runtime.remove(handle)
            n += 1
    return n
