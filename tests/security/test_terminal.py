"""Control characters on the terminal (issue 9.8): nothing a sandbox writes reaches a terminal raw.

An agent answers with ESC/CSI (clear screen), OSC (set the window title), BEL, BS and CR; the
automation lines, the human live view and `massgen-run logs` must print them escaped.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from agent_image.protocol.automation import tail_lines
from tests.cli_helpers import massgen_run, parse_lines

HOSTILE = "\x1b]0;pwned\x07\x1b[2J\x1b[1;1H\b\b\rnothing to see \x9b31m\u202eevil"
# Anything below 0x20 but newline (automation) or newline/tab (human), DEL, and C1 controls.
RAW_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u202e]")


def _config(tmp_path: Path) -> Path:
    # The container's own output (it ends up in massgen.log) gets the same sequences.
    shout = "printf 'tool says \\033]0;pwned\\007\\033[2J\\b\\r\\n' > /proc/1/fd/2"
    steps = [{"shell": shout}, {"answer": HOSTILE}, {"vote": "auto"}]
    config = {
        "agents": [
            {"id": "agent_a", "backend": {"type": "scripted", "steps": steps}},
            {"id": "agent_b", "backend": {"type": "scripted", "steps": [{"answer": "4"}, {"vote": "agent_a"}]}},
        ]
    }
    path = tmp_path / "run.yaml"
    path.write_text(json.dumps(config))
    return path


def test_no_control_character_reaches_stdout_in_any_mode(agent_image: str, tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    auto = massgen_run(["--automation", "--config", str(cfg), "--image", agent_image, "Q?"], tmp_path)
    assert auto.returncode == 0, auto.stdout + auto.stderr
    f = parse_lines(auto.stdout)
    assert f["WINNER"] == "agent_a"
    assert "\\x1b]0;pwned\\x07" in f["ANSWER_PREVIEW"]  # escaped, not dropped: the reader sees what was sent
    assert not RAW_CONTROL.search(auto.stdout) and auto.stdout.isascii()
    # the answer file itself keeps the exact bytes the agent wrote
    assert Path(f["ANSWER_FILE"]).read_bytes().decode() == HOSTILE

    human = massgen_run(["--config", str(cfg), "--image", agent_image, "Q?"], tmp_path)
    assert human.returncode == 0, human.stdout + human.stderr
    assert "pwned" in human.stdout and not RAW_CONTROL.search(human.stdout + human.stderr)

    logs = massgen_run(["logs", f["RUN_ID"]], tmp_path)
    assert logs.returncode == 0, logs.stderr
    assert "tool says \\x1b]0;pwned\\x07" in logs.stdout
    assert not RAW_CONTROL.search(logs.stdout)


def test_a_forged_detail_is_escaped_on_the_failed_line() -> None:
    lines = tail_lines(
        exit_code=2,
        reason="agent_failed\x1b[2J",
        detail=HOSTILE,
        winner=None,
        duration_s=1.0,
        answer_file=None,
        answer_text="",
        n_agents=2,
    )
    assert len(lines) == 1 and lines[0].startswith("FAILED: agent_failed\\x1b[2J: ")
    assert not RAW_CONTROL.search(lines[0]) and lines[0].isascii()
