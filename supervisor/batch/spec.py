"""`batch.yaml`: the strict spec, its expansion into items, and their stable identities."""

from __future__ import annotations

import copy
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from agent_image.protocol.config import RunConfig
from agent_image.protocol.loader import ConfigError, ConfigProblem, dump_config, line_of, parse_yaml_text

from ..configs import resolve_config

MAX_SPEC_BYTES = 4 << 20
MAX_ITEMS = 100_000
ID_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_.:-]{0,99}\Z")
LABEL_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,59}\Z")
# Knobs that decide how a run is hosted, not what is measured: changing them keeps item ids
# (a batch moved to a bigger machine, or to gVisor, resumes instead of starting over).
RUNTIME_KNOBS = ("image", "runtime", "memory", "cpus", "pids", "stop_grace_seconds")
_DURATION_RE = re.compile(r"\A\s*(\d+(?:\.\d+)?)\s*(s|m|h)?\s*\Z")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


# -- assertions -------------------------------------------------------------------------------


class Equals(_Strict):
    type: Literal["equals"]
    value: Any = None  # default: the question's `expected`
    normalize: bool = True  # strip, collapse whitespace, casefold


class Contains(_Strict):
    type: Literal["contains"]
    value: Any = None
    ignore_case: bool = False


class Regex(_Strict):
    type: Literal["regex"]
    pattern: str
    ignore_case: bool = False

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, v: str) -> str:
        try:
            re.compile(v)
        except re.error as exc:
            raise ValueError(f"not a regular expression: {exc}") from exc
        return v


class JsonSchema(_Strict):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")

    @field_validator("schema_")
    @classmethod
    def _valid(cls, v: dict[str, Any]) -> dict[str, Any]:
        import jsonschema

        try:
            jsonschema.validators.validator_for(v).check_schema(v)
        except jsonschema.SchemaError as exc:
            raise ValueError(f"not a valid JSON Schema: {exc.message}") from exc
        return v


class NumberClose(_Strict):
    type: Literal["number_close"]
    value: float | None = None
    abs_tol: float = Field(default=1e-6, ge=0)
    rel_tol: float = Field(default=0.0, ge=0)
    extract: str | None = None  # a regex whose group 1 (or whole match) is the number

    @field_validator("extract")
    @classmethod
    def _compiles(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as exc:
                raise ValueError(f"not a regular expression: {exc}") from exc
        return v


class WinnerIn(_Strict):
    type: Literal["winner_in"]
    agents: list[str] = Field(min_length=1)


class Consensus(_Strict):
    type: Literal["consensus"]
    min_share: float = Field(default=1.0, gt=0, le=1)  # of the standing votes, for the winner


class MinAnswers(_Strict):
    type: Literal["min_answers"]
    count: int = Field(ge=1)


class NoAgentErrors(_Strict):
    type: Literal["no_agent_errors"]


class VotesFor(_Strict):
    type: Literal["votes_for"]
    agent: str
    min: int = Field(default=1, ge=0)


class CommandGrader(_Strict):
    type: Literal["command"]
    run: str = Field(min_length=1, max_length=10_000)
    timeout_s: float = Field(default=60, gt=0, le=3600)
    memory: str = "256m"


class LlmRubric(_Strict):
    """A model grades the answer against `rubric` (OpenAI-compatible, through a gateway)."""

    type: Literal["llm_rubric"]
    rubric: str = Field(min_length=1, max_length=20_000)
    model: str = Field(min_length=1, max_length=200)
    base_url: str | None = None  # default: the host's OPENAI_BASE_URL (or keys file)
    min_score: float = Field(default=0.0, ge=0, le=1)


Assertion = Annotated[
    Equals
    | Contains
    | Regex
    | JsonSchema
    | NumberClose
    | WinnerIn
    | Consensus
    | MinAnswers
    | NoAgentErrors
    | VotesFor
    | CommandGrader
    | LlmRubric,
    Field(discriminator="type"),
]


# -- the spec ---------------------------------------------------------------------------------


class VaryAxis(_Strict):
    path: str = Field(min_length=1)  # dotted, `*` for every list element: agents.*.backend.model
    values: list[Any] = Field(min_length=1, max_length=100)
    labels: list[str] | None = None

    @model_validator(mode="after")
    def _labels(self) -> VaryAxis:
        if self.labels is not None and len(self.labels) != len(self.values):
            raise ValueError("labels must name every value")
        return self


class ConfigEntry(_Strict):
    file: str = Field(min_length=1)
    set: dict[str, Any] = Field(default_factory=dict)
    vary: dict[str, VaryAxis] = Field(default_factory=dict)
    assert_: list[Assertion] = Field(default_factory=list, alias="assert")


class QuestionEntry(_Strict):
    id: str
    question: str = Field(min_length=1, max_length=100_000)
    expected: Any = None
    tags: list[str] = Field(default_factory=list)
    assert_: list[Assertion] = Field(default_factory=list, alias="assert")

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        if not ID_RE.match(v):
            raise ValueError("question id: letters, digits and _ . : -, 1-100 chars, starting alphanumeric")
        return v


class QuestionsFile(_Strict):
    file: str


class MinPassRate(_Strict):
    global_: float | None = Field(default=None, alias="global", ge=0, le=1)
    configs: dict[str, float] = Field(default_factory=dict)
    tags: dict[str, float] = Field(default_factory=dict)


class NoRegression(_Strict):
    baseline: str
    candidate: str
    mode: Literal["non_inferior", "significant"] = "non_inferior"
    delta: float = Field(default=0.0, ge=0, le=1)


class Gates(_Strict):
    min_pass_rate: float | MinPassRate | None = None
    min_item_pass_rate: float | None = Field(default=None, ge=0, le=1)
    no_regression: list[NoRegression] = Field(default_factory=list)
    max_cost_usd: float | None = Field(default=None, ge=0)


class Compare(_Strict):
    baseline: str
    candidate: str


class BatchBudget(_Strict):
    max_cost_usd: float | None = Field(default=None, gt=0)
    max_tokens: int | None = Field(default=None, ge=1)
    max_calls: int | None = Field(default=None, ge=1)


class Retry(_Strict):
    max_attempts: int = Field(default=3, ge=1, le=20)
    backoff_s: float = Field(default=2.0, ge=0, le=600)


class StatsSettings(_Strict):
    bootstrap_samples: int = Field(default=2000, ge=100, le=100_000)
    alpha: float = Field(default=0.05, gt=0, lt=1)
    pass_k: list[int] = Field(default_factory=list)  # default: 1 and `repeats`


class BatchSpecModel(_Strict):
    name: str | None = None
    configs: dict[str, str | ConfigEntry] = Field(min_length=1)
    questions: list[QuestionEntry] | QuestionsFile | str
    repeats: int = Field(default=1, ge=1, le=1000)
    seed: int = 0
    assert_: list[Assertion] = Field(default_factory=list, alias="assert")
    gates: Gates = Field(default_factory=Gates)
    compare: list[Compare] = Field(default_factory=list)
    budget: BatchBudget = Field(default_factory=BatchBudget)
    grading_budget: BatchBudget = Field(default_factory=BatchBudget)  # llm_rubric calls, apart from items'
    deadline: float | str | None = None  # seconds, or "90s" / "30m" / "2h"
    max_parallel: int = Field(default=4, ge=1, le=256)
    max_item_errors: int = Field(default=0, ge=0)
    retry: Retry = Field(default_factory=Retry)
    stats: StatsSettings = Field(default_factory=StatsSettings)

    @field_validator("deadline")
    @classmethod
    def _deadline(cls, v: float | str | None) -> float | str | None:
        if v is not None:
            parse_duration(v)
        return v


def parse_duration(v: float | str) -> float:
    """`90`, `"90s"`, `"30m"`, `"2h"` -> seconds.

    Raises:
        ValueError: not a positive duration.
    """
    if isinstance(v, int | float):
        seconds = float(v)
    else:
        m = _DURATION_RE.match(v)
        if not m:
            raise ValueError(f"not a duration: {v!r} (seconds, or 90s / 30m / 2h)")
        seconds = float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, None: 1}[m.group(2)]
    if seconds <= 0:
        raise ValueError("a duration must be positive")
    return seconds


# -- the resolved batch -----------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """One config label of the batch: a file, possibly with overrides applied."""

    label: str
    source: str  # as written in the spec (a path or @examples/NAME)
    raw: dict[str, Any]  # the config after overrides
    config: RunConfig
    assertions: tuple[Any, ...]
    identity: str  # hash of the config without runtime knobs


@dataclass(frozen=True)
class Question:
    id: str
    question: str
    expected: Any
    tags: tuple[str, ...]
    assertions: tuple[Any, ...]


@dataclass(frozen=True)
class Item:
    """One (config, question, repeat): the unit that gets a verdict."""

    id: str
    config: str
    question: str  # question id
    repeat: int
    index: int  # position in the plan (configs, then questions, then repeats)


@dataclass
class Batch:
    """A validated spec, expanded."""

    path: Path
    spec: BatchSpecModel
    name: str
    variants: dict[str, Variant]
    questions: dict[str, Question]
    items: list[Item]
    fingerprint: str
    deadline_s: float | None
    pass_k: list[int] = field(default_factory=list)

    def assertions_for(self, item: Item) -> list[Any]:
        return [*self.spec.assert_, *self.variants[item.config].assertions, *self.questions[item.question].assertions]

    def resolved(self) -> dict[str, Any]:
        """The resolved spec for batch.json."""
        return {
            "name": self.name,
            "spec_file": str(self.path),
            "configs": {
                v.label: {"source": v.source, "identity": v.identity, "config": v.raw} for v in self.variants.values()
            },
            "questions": [
                {"id": q.id, "question": q.question, "expected": q.expected, "tags": list(q.tags)}
                for q in self.questions.values()
            ],
            "repeats": self.spec.repeats,
            "seed": self.spec.seed,
            "assert": [a.model_dump(by_alias=True) for a in self.spec.assert_],
            "gates": self.spec.gates.model_dump(by_alias=True),
            "compare": [c.model_dump() for c in self.spec.compare],
            "budget": self.spec.budget.model_dump(),
            "grading_budget": self.spec.grading_budget.model_dump(),
            "deadline_s": self.deadline_s,
            "max_parallel": self.spec.max_parallel,
            "max_item_errors": self.spec.max_item_errors,
            "retry": self.spec.retry.model_dump(),
            "stats": {**self.spec.stats.model_dump(), "pass_k": self.pass_k},
            "items": len(self.items),
        }


def canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)


def _digest(obj: Any, n: int = 16) -> str:
    return hashlib.sha256(canonical(obj).encode()).hexdigest()[:n]


def config_identity(raw: dict[str, Any]) -> str:
    """The config's hash without runtime knobs (the sandbox's image, runtime and resources)."""
    stripped = copy.deepcopy(raw)
    sb = stripped.get("sandbox")
    if isinstance(sb, dict):
        for k in RUNTIME_KNOBS:
            sb.pop(k, None)
        if not sb:
            stripped.pop("sandbox")
    return _digest(stripped)


def item_id(variant: Variant, q: Question, repeat: int, seed: int, assertions: list[Any]) -> str:
    """Stable over runs and machines: the measured config, the question, the grading, repeat and seed."""
    return _digest(
        {
            "config": variant.identity,
            "question": {"id": q.id, "question": q.question, "expected": q.expected},
            "assert": [a.model_dump(by_alias=True, mode="json") for a in assertions],
            "repeat": repeat,
            "seed": seed,
        }
    )


# -- overrides --------------------------------------------------------------------------------


def apply_override(raw: dict[str, Any], path: str, value: Any) -> None:
    """Set `path` (dotted; `*` = every list element; numbers index lists) in `raw`.

    Raises:
        ValueError: the path does not lead anywhere in the config.
    """
    parts = path.split(".")

    def walk(node: Any, i: int) -> None:
        part = parts[i]
        last = i == len(parts) - 1
        if isinstance(node, list):
            if part == "*":
                targets = list(range(len(node)))
            elif part.isdigit() and int(part) < len(node):
                targets = [int(part)]
            else:
                raise ValueError(f"{path}: {part!r} is not an index of a list of {len(node)}")
            for t in targets:
                if last:
                    node[t] = copy.deepcopy(value)
                else:
                    walk(node[t], i + 1)
        elif isinstance(node, dict):
            if part == "*":
                raise ValueError(f"{path}: '*' only applies to lists")
            if last:
                node[part] = copy.deepcopy(value)
            else:
                walk(node.setdefault(part, {}), i + 1)
        else:
            raise ValueError(f"{path}: {'.'.join(parts[:i])} is not a mapping or a list")

    walk(raw, 0)


def _value_label(v: Any) -> str:
    text = v if isinstance(v, str) else canonical(v)
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text)[:40] or "_"


# -- loading ----------------------------------------------------------------------------------


class SpecError(ConfigError):
    """The batch spec cannot be run (every problem names the file, the key and the line)."""


def _tag_fits(tag: str, node: Any) -> bool:
    """Whether a pydantic union-member tag in an error location is the member this data is."""
    if tag.startswith("list["):
        return isinstance(node, list)
    if tag.startswith("dict["):
        return isinstance(node, dict)
    if tag in ("str",):
        return isinstance(node, str)
    if tag in ("float", "int"):
        return isinstance(node, int | float) and not isinstance(node, bool)
    if tag[:1].isupper():
        return isinstance(node, dict)
    return True


def _clean_loc(loc: tuple[Any, ...], data: Any) -> tuple[tuple[Any, ...], bool]:
    """(the location in document keys, whether the error is about the union member the data is)."""
    out: list[Any] = []
    node = data
    fits = True
    for i, part in enumerate(loc):
        in_dict = isinstance(node, dict) and part in node
        in_list = isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)
        if in_dict or in_list:
            node = node[part]
            out.append(part)
        elif isinstance(node, dict) and i == len(loc) - 1:
            out.append(part)  # a missing or unknown key
        elif isinstance(part, str) and not (isinstance(node, dict) and part in node):
            fits = fits and _tag_fits(part, node)
        else:
            out.append(part)
    return tuple(out), fits


def _problems_from(
    exc: ValidationError, file: str, index: dict[tuple[Any, ...], int], data: Any, prefix: tuple[Any, ...] = ()
) -> list[ConfigProblem]:
    cleaned = []
    for err in exc.errors():
        loc, fits = _clean_loc(tuple(err["loc"]), data)
        cleaned.append((err, loc, fits))
    if any(f for _e, _l, f in cleaned):
        cleaned = [c for c in cleaned if c[2]]
    out: list[ConfigProblem] = []
    for err, loc, _fits in cleaned:
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "missing":
            msg = "required key is missing"
        full = (*prefix, *loc)
        out.append(ConfigProblem(file, ".".join(str(p) for p in full), line_of(index, full), msg))
    unique: list[ConfigProblem] = []
    for p in out:
        if p.key not in {u.key for u in unique}:
            unique.append(p)
    return unique


def _load_questions_file(path: Path, spec_file: str) -> list[tuple[dict[str, Any], int]]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError([ConfigProblem(spec_file, "questions", None, f"cannot read {path}: {exc}")]) from exc
    rows: list[tuple[dict[str, Any], int]] = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SpecError([ConfigProblem(str(path), "", n, f"not JSON: {exc.msg}")]) from exc
        if not isinstance(obj, dict):
            raise SpecError([ConfigProblem(str(path), "", n, "each line must be a JSON object")])
        rows.append((obj, n))
    return rows


def load_batch(path: Path) -> Batch:
    """Read, validate and expand a batch spec.

    Raises:
        SpecError: anything wrong, with file, key and line.
    """
    file = str(path)
    try:
        if path.stat().st_size > MAX_SPEC_BYTES:
            raise SpecError([ConfigProblem(file, "", None, "batch spec larger than 4 MiB")])
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise SpecError([ConfigProblem(file, "", None, "batch spec not found")], "config_missing") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError([ConfigProblem(file, "", None, f"cannot read batch spec: {exc}")], "config_missing") from exc
    try:
        data, index = parse_yaml_text(text, file)
    except ConfigError as exc:
        raise SpecError(exc.problems) from exc
    if not isinstance(data, dict):
        raise SpecError([ConfigProblem(file, "", 1, "a batch spec is a YAML mapping with configs and questions")])
    try:
        spec = BatchSpecModel.model_validate(data)
    except ValidationError as exc:
        raise SpecError(_problems_from(exc, file, index, data)) from exc
    base = path.parent
    problems: list[ConfigProblem] = []

    # questions
    questions: dict[str, Question] = {}
    q_rows: list[tuple[Any, str, int | None, tuple[Any, ...], dict[tuple[Any, ...], int]]] = []
    if isinstance(spec.questions, list):
        for i, _q in enumerate(spec.questions):
            q_rows.append((data["questions"][i], file, line_of(index, ("questions", i)), ("questions", i), index))
    else:
        qfile = spec.questions if isinstance(spec.questions, str) else spec.questions.file
        qpath = (base / qfile) if not Path(qfile).is_absolute() else Path(qfile)
        for obj, n in _load_questions_file(qpath, file):
            q_rows.append((obj, str(qpath), n, (), {(): n}))
    for obj, qf, line, prefix, idx in q_rows:
        try:
            qe = QuestionEntry.model_validate(obj)
        except ValidationError as exc:
            if prefix:
                problems += _problems_from(exc, qf, idx, obj, prefix)
            else:
                problems += [ConfigProblem(qf, p.key, line, p.message) for p in _problems_from(exc, qf, {}, obj)]
            continue
        if qe.id in questions:
            problems.append(
                ConfigProblem(qf, ".".join(map(str, (*prefix, "id"))), line, f"duplicate question id {qe.id!r}")
            )
            continue
        questions[qe.id] = Question(qe.id, qe.question, qe.expected, tuple(qe.tags), tuple(qe.assert_))
    if not questions and not problems:
        problems.append(ConfigProblem(file, "questions", line_of(index, ("questions",)), "no questions"))

    # configs and their variants
    variants: dict[str, Variant] = {}
    for label, entry in spec.configs.items():
        key = ("configs", label)
        line = line_of(index, key)
        if not LABEL_RE.match(label):
            problems.append(ConfigProblem(file, f"configs.{label}", line, "labels: letters, digits, _ . -, 1-60 chars"))
            continue
        ce = entry if isinstance(entry, ConfigEntry) else ConfigEntry(file=entry)
        source = ce.file
        if not source.startswith("@examples/") and not Path(source).expanduser().is_absolute():
            source = str(base / source)
        try:
            _cfg, raw, _where = resolve_config(source)
        except ConfigError as exc:
            problems.append(ConfigProblem(file, f"configs.{label}", line, f"{exc}"))
            continue
        for p, v in ce.set.items():
            try:
                apply_override(raw, p, v)
            except ValueError as exc:
                problems.append(ConfigProblem(file, f"configs.{label}.set", line_of(index, (*key, "set", p)), str(exc)))
        axes = list(ce.vary.items())
        combos: list[list[tuple[str, str, str, Any]]] = [[]]
        for axis, ax in axes:
            labels = ax.labels or [_value_label(v) for v in ax.values]
            combos = [[*c, (axis, lab, ax.path, v)] for c in combos for lab, v in zip(labels, ax.values, strict=True)]
        for combo in combos:
            vraw = copy.deepcopy(raw)
            name = label
            if combo:
                name = f"{label}[{','.join(f'{a}={lab}' for a, lab, _p, _v in combo)}]"
            bad = False
            for axis, _lab, p, v in combo:
                try:
                    apply_override(vraw, p, v)
                except ValueError as exc:
                    problems.append(
                        ConfigProblem(
                            file, f"configs.{label}.vary.{axis}", line_of(index, (*key, "vary", axis)), str(exc)
                        )
                    )
                    bad = True
            if bad:
                continue
            try:
                config = RunConfig.model_validate(vraw)
            except ValidationError as exc:
                first = exc.errors()[0]
                where = ".".join(str(x) for x in first["loc"])
                msg = first["msg"].removeprefix("Value error, ")
                problems.append(ConfigProblem(file, f"configs.{label}", line, f"{name}: {where}: {msg}"))
                continue
            if name in variants:
                problems.append(ConfigProblem(file, f"configs.{label}", line, f"duplicate config label {name!r}"))
                continue
            variants[name] = Variant(name, ce.file, vraw, config, tuple(ce.assert_), config_identity(vraw))

    # assertions that need an expected value must have one
    for q in questions.values():
        for v in variants.values():
            for a in [*spec.assert_, *v.assertions, *q.assertions]:
                needs_expected = getattr(a, "type", "") in ("equals", "contains", "number_close")
                if needs_expected and a.value is None and q.expected is None:
                    problems.append(
                        ConfigProblem(
                            file,
                            "assert",
                            line_of(index, ("assert",)),
                            f"{a.type} needs a value or the question's expected (question {q.id!r} has none)",
                        )
                    )
    known = set(variants)
    for i, c in enumerate(spec.compare):
        for side in ("baseline", "candidate"):
            if getattr(c, side) not in known:
                problems.append(
                    ConfigProblem(
                        file,
                        f"compare.{i}.{side}",
                        line_of(index, ("compare", i, side)),
                        f"no config labelled {getattr(c, side)!r}",
                    )
                )
    for i, g in enumerate(spec.gates.no_regression):
        for side in ("baseline", "candidate"):
            if getattr(g, side) not in known:
                problems.append(
                    ConfigProblem(
                        file,
                        f"gates.no_regression.{i}.{side}",
                        line_of(index, ("gates", "no_regression", i, side)),
                        f"no config labelled {getattr(g, side)!r}",
                    )
                )
    mpr = spec.gates.min_pass_rate
    if isinstance(mpr, MinPassRate):
        for lab in mpr.configs:
            if lab not in known:
                problems.append(
                    ConfigProblem(
                        file,
                        f"gates.min_pass_rate.configs.{lab}",
                        line_of(index, ("gates", "min_pass_rate", "configs", lab)),
                        "no such config label",
                    )
                )
    if problems:
        unique = list(dict.fromkeys(problems))
        raise SpecError(unique)

    total = len(variants) * len(questions) * spec.repeats
    if total > MAX_ITEMS:
        raise SpecError([ConfigProblem(file, "", None, f"{total} items; at most {MAX_ITEMS} per batch")])
    items: list[Item] = []
    seen: set[str] = set()
    for v in variants.values():
        for q in questions.values():
            for r in range(spec.repeats):
                assertions = [*spec.assert_, *v.assertions, *q.assertions]
                iid = item_id(v, q, r, spec.seed, assertions)
                if iid in seen:  # two labels with the same measured config: keep them apart
                    iid = _digest({"dup": iid, "label": v.label})
                seen.add(iid)
                items.append(Item(iid, v.label, q.id, r, len(items)))
    pass_k = spec.stats.pass_k or sorted({1, spec.repeats})
    fingerprint = _digest(
        {
            "items": [i.id for i in items],
            "labels": [(i.config, i.question, i.repeat) for i in items],
            "gates": spec.gates.model_dump(by_alias=True, mode="json"),
            "compare": [c.model_dump() for c in spec.compare],
            "stats": spec.stats.model_dump(mode="json"),
            "max_item_errors": spec.max_item_errors,
        }
    )
    return Batch(
        path=path,
        spec=spec,
        name=spec.name or path.stem,
        variants=variants,
        questions=questions,
        items=items,
        fingerprint=fingerprint,
        deadline_s=parse_duration(spec.deadline) if spec.deadline is not None else None,
        pass_k=pass_k,
    )


def config_text(variant: Variant) -> str:
    return dump_config(variant.raw)


def shard_items(items: list[Item], shard: tuple[int, int] | None) -> list[Item]:
    """Items of shard i of n (1-based), balanced by id so each shard gets a mix of configs."""
    if shard is None:
        return list(items)
    i, n = shard
    return [it for it in items if int(it.id, 16) % n == i - 1]
