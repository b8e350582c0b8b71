"""batch.yaml: strict validation with file/key/line, expansion into items, stable item ids."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from supervisor.batch.spec import SpecError, apply_override, load_batch, parse_duration, shard_items

DATA = Path(__file__).resolve().parent.parent / "data" / "batch"

QUICK = """\
agents:
  - id: a
    backend:
      type: scripted
      steps:
        - answer: "4"
        - vote: auto
          reason: ok
  - id: b
    backend:
      type: scripted
      steps:
        - answer: "four"
        - vote: auto
          reason: ok
"""


def _write(tmp: Path, spec: str, **files: str) -> Path:
    for name, text in files.items():
        (tmp / name).write_text(text)
    p = tmp / "batch.yaml"
    p.write_text(spec)
    return p


def _problems(path: Path) -> list[str]:
    with pytest.raises(SpecError) as ei:
        load_batch(path)
    return [str(p) for p in ei.value.problems]


def test_example_spec_expands_to_60_items() -> None:
    """2 configs x 10 questions x 3 repeats: 60 items in config, question, repeat order, unique ids."""
    b = load_batch(DATA / "batch.yaml")
    assert len(b.items) == 60
    assert list(b.variants) == ["good", "flaky"]
    assert [(i.config, i.question, i.repeat) for i in b.items[:4]] == [
        ("good", "q01", 0),
        ("good", "q01", 1),
        ("good", "q01", 2),
        ("good", "q02", 0),
    ]
    assert len({i.id for i in b.items}) == 60
    assert b.pass_k == [1, 3]
    assert b.questions["q03"].tags == ("mul",)


def test_item_ids_are_stable_and_ignore_runtime_knobs(tmp_path: Path) -> None:
    """Ids survive a reload and a change of sandbox memory/cpus; the question text or seed changes them."""
    spec = "configs:\n  c: cfg.yaml\nquestions:\n  - id: q1\n    question: What is 2+2?\n    expected: 4\nrepeats: 2\n"
    p = _write(tmp_path, spec, **{"cfg.yaml": QUICK})
    ids = [i.id for i in load_batch(p).items]
    assert ids == [i.id for i in load_batch(p).items]
    (tmp_path / "cfg.yaml").write_text(QUICK + "sandbox:\n  memory: 512m\n  cpus: 2\n")
    assert [i.id for i in load_batch(p).items] == ids
    (tmp_path / "cfg.yaml").write_text(QUICK + "timeout_settings:\n  orchestrator_timeout_seconds: 5\n")
    assert [i.id for i in load_batch(p).items] != ids
    (tmp_path / "cfg.yaml").write_text(QUICK)
    p.write_text(spec.replace("2+2", "3+3"))
    assert [i.id for i in load_batch(p).items] != ids
    p.write_text(spec + "seed: 1\n")
    assert [i.id for i in load_batch(p).items] != ids


def test_fingerprint_covers_gates_but_not_parallelism(tmp_path: Path) -> None:
    """A gate change changes the fingerprint (resume needs --allow-changed); max_parallel does not."""
    spec = "configs:\n  c: cfg.yaml\nquestions:\n  - id: q1\n    question: Q\n"
    p = _write(tmp_path, spec, **{"cfg.yaml": QUICK})
    fp = load_batch(p).fingerprint
    p.write_text(spec + "max_parallel: 9\n")
    assert load_batch(p).fingerprint == fp
    p.write_text(spec + "gates:\n  min_pass_rate: 0.5\n")
    assert load_batch(p).fingerprint != fp


def test_unknown_key_names_file_key_and_line(tmp_path: Path) -> None:
    """A typo is an error naming the spec file, the dotted key and its line."""
    spec = "configs:\n  c: cfg.yaml\nquestions:\n  - id: q1\n    question: Q\nrepeats: 2\nretry:\n  max_attempt: 3\n"
    p = _write(tmp_path, spec, **{"cfg.yaml": QUICK})
    probs = _problems(p)
    assert probs == [f"{p}:8: key=retry.max_attempt unknown key"]


def test_bad_assertion_and_missing_id(tmp_path: Path) -> None:
    """An unknown assertion type and a question without id are both reported with their lines."""
    spec = "configs:\n  c: cfg.yaml\nquestions:\n  - question: Q\nassert:\n  - type: equalz\n    value: 4\n"
    p = _write(tmp_path, spec, **{"cfg.yaml": QUICK})
    probs = _problems(p)
    assert any(s.startswith(f"{p}:4: key=questions.0.id") and "missing" in s for s in probs), probs
    assert any(s.startswith(f"{p}:6: key=assert.0") for s in probs), probs


def test_questions_jsonl_errors_name_their_line(tmp_path: Path) -> None:
    """A broken JSONL line, a duplicate id: the questions file and its line are named."""
    qs = '{"id": "a", "question": "x"}\n{"id": "b", "question": \n'
    p = _write(tmp_path, "configs:\n  c: cfg.yaml\nquestions: qs.jsonl\n", **{"cfg.yaml": QUICK, "qs.jsonl": qs})
    probs = _problems(p)
    assert probs[0].startswith(f"{tmp_path / 'qs.jsonl'}:2:")
    (tmp_path / "qs.jsonl").write_text('{"id": "a", "question": "x"}\n\n{"id": "a", "question": "y"}\n')
    probs = _problems(p)
    assert probs == [f"{tmp_path / 'qs.jsonl'}:3: key=id duplicate question id 'a'"]


def test_missing_config_and_unknown_compare_label(tmp_path: Path) -> None:
    """A config file that does not exist and a compare against an unknown label are spec errors."""
    spec = "configs:\n  c: nope.yaml\nquestions:\n  - id: q\n    question: Q\ncompare:\n  - baseline: c\n    candidate: d\n"
    p = _write(tmp_path, spec)
    probs = _problems(p)
    assert any(s.startswith(f"{p}:2: key=configs.c") and "not found" in s for s in probs), probs
    assert any(s.startswith(f"{p}:8: key=compare.0.candidate") for s in probs), probs


def test_equals_without_expected_is_an_error(tmp_path: Path) -> None:
    """`equals` with no value needs the question's `expected`."""
    spec = "configs:\n  c: cfg.yaml\nquestions:\n  - id: q\n    question: Q\nassert:\n  - type: equals\n"
    p = _write(tmp_path, spec, **{"cfg.yaml": QUICK})
    assert "needs a value or the question's expected" in _problems(p)[0]


def test_vary_axes_expand_labelled_variants(tmp_path: Path) -> None:
    """`vary` makes one labelled variant per value (cartesian over axes), overrides applied; `set` too."""
    spec = (
        "configs:\n"
        "  base:\n"
        "    file: cfg.yaml\n"
        "    set:\n      timeout_settings.orchestrator_timeout_seconds: 33\n"
        "    vary:\n"
        "      msg:\n        path: agents.*.system_message\n        values: [terse, verbose]\n"
        "      grace:\n        path: sandbox.stop_grace_seconds\n        values: [1, 2]\n"
        "questions:\n  - id: q\n    question: Q\n"
    )
    p = _write(tmp_path, spec, **{"cfg.yaml": QUICK})
    b = load_batch(p)
    assert list(b.variants) == [
        "base[msg=terse,grace=1]",
        "base[msg=terse,grace=2]",
        "base[msg=verbose,grace=1]",
        "base[msg=verbose,grace=2]",
    ]
    v = b.variants["base[msg=verbose,grace=2]"]
    assert [a.system_message for a in v.config.agents] == ["verbose", "verbose"]
    assert v.config.timeout_settings.orchestrator_timeout_seconds == 33
    # grace is a runtime knob: two variants differing only in it measure the same thing, yet keep apart
    assert len({i.id for i in b.items}) == 4


def test_vary_to_a_bad_path_is_an_error(tmp_path: Path) -> None:
    """An override that leads nowhere names the axis and its line."""
    spec = (
        "configs:\n  base:\n    file: cfg.yaml\n    vary:\n      m:\n        path: agents.7.backend.model\n"
        "        values: [x]\nquestions:\n  - id: q\n    question: Q\n"
    )
    p = _write(tmp_path, spec, **{"cfg.yaml": QUICK})
    probs = _problems(p)
    assert probs[0].startswith(f"{p}:5: key=configs.base.vary.m") and "not an index" in probs[0]


def test_apply_override_paths() -> None:
    """Dotted paths with indices and `*`; mappings are created on the way."""
    raw = {"agents": [{"backend": {"model": "a"}}, {"backend": {"model": "b"}}]}
    apply_override(raw, "agents.*.backend.model", "m")
    apply_override(raw, "agents.1.id", "x")
    apply_override(raw, "sandbox.budget.max_calls", 3)
    assert raw == {
        "agents": [{"backend": {"model": "m"}}, {"backend": {"model": "m"}, "id": "x"}],
        "sandbox": {"budget": {"max_calls": 3}},
    }
    with pytest.raises(ValueError):
        apply_override(raw, "agents.*.backend.model.x", 1)


def test_shards_partition_the_plan() -> None:
    """Shards are disjoint and together the whole plan."""
    b = load_batch(DATA / "batch.yaml")
    parts = [shard_items(b.items, (i, 3)) for i in (1, 2, 3)]
    assert sorted(i.id for p in parts for i in p) == sorted(i.id for i in b.items)
    assert all(parts)


def test_durations() -> None:
    """deadline: seconds or 90s / 30m / 2h."""
    assert parse_duration(90) == 90
    assert parse_duration("30m") == 1800
    assert parse_duration("2h") == 7200
    with pytest.raises(ValueError):
        parse_duration("soon")


def test_resolved_spec_is_json() -> None:
    """batch.json's resolved spec serializes."""
    b = load_batch(DATA / "batch.yaml")
    doc = json.loads(json.dumps(b.resolved()))
    assert doc["items"] == 60 and set(doc["configs"]) == {"good", "flaky"}


def test_cost_budget_with_an_unpriced_model_is_a_preflight_error(tmp_path: Path) -> None:
    """A batch cost budget needs a price for every model a config uses; scripted configs need none."""
    from supervisor.batch.runner import preflight_problems

    model = "agents:\n  - id: m\n    backend: {type: openai, model: no-such-model-x}\n"
    spec = "configs:\n  m: m.yaml\n  s: cfg.yaml\nquestions:\n  - id: q\n    question: Q\n"
    p = _write(tmp_path, spec + "budget:\n  max_cost_usd: 1\n", **{"m.yaml": model, "cfg.yaml": QUICK})
    probs = preflight_problems(load_batch(p))
    assert len(probs) == 1 and "openai/no-such-model-x" in probs[0] and "no price" in probs[0]
    p.write_text(spec)  # no cost budget: nothing to enforce, no problem
    assert preflight_problems(load_batch(p)) == []
    p.write_text(spec + "budget:\n  max_calls: 10\n")
    assert preflight_problems(load_batch(p)) == []
