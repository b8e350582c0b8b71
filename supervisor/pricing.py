"""Model prices (USD per 1M tokens) for the model gateway's cost metering and cost budgets.

The table lives in ``configs/pricing.json``; env ``MASSGEN_PRICING_FILE`` names a replacement.
Files are JSON, or JSON-compatible YAML with whole-line ``#`` comments: the supervisor keeps a
single YAML-importing module (``agent_image.protocol.loader``, whose only loader is for run
configs), so data files here are read with ``json``.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import DataFileError as DataFileError  # also importable from here

log = logging.getLogger(__name__)

DEFAULT_PRICING_FILE = Path(__file__).resolve().parent.parent / "configs" / "pricing.json"
MAX_DATA_FILE_BYTES = 1 << 20
# "gpt-4o-2024-08-06" -> "gpt-4o", "gemini-2.0-flash-001" -> "gemini-2.0-flash", "...-latest".
_VERSION_SUFFIX = re.compile(r"-(?:\d{4}-\d{2}-\d{2}|\d{3,8}|latest)\Z")


def read_data_file(path: str | os.PathLike[str]) -> Any:
    """Parse a JSON file, allowing whole-line ``#`` comments (JSON-compatible YAML).

    Raises:
        DataFileError: unreadable, larger than 1 MiB, or not JSON; the message has the line.
    """
    p = Path(path)
    try:
        if p.stat().st_size > MAX_DATA_FILE_BYTES:
            raise DataFileError(str(p), "larger than 1 MiB")
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        raise DataFileError(str(p), f"cannot read: {type(exc).__name__}: {reason}") from exc
    # Blank the comment lines instead of dropping them so JSON errors keep the file's line numbers.
    lines = ["" if line.lstrip().startswith("#") else line for line in text.splitlines()]
    try:
        return json.loads("\n".join(lines))
    except json.JSONDecodeError as exc:
        raise DataFileError(str(p), f"line {exc.lineno}: not JSON ({exc.msg}); use JSON or flow-style YAML") from exc


@dataclass(frozen=True)
class ModelPrice:
    """USD per 1M tokens."""

    input: float
    cached_input: float
    output: float

    def cost(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> float:
        cached = min(max(cached_tokens, 0), max(prompt_tokens, 0))
        fresh = max(prompt_tokens, 0) - cached
        return (fresh * self.input + cached * self.cached_input + max(completion_tokens, 0) * self.output) / 1e6


class Pricing:
    """Prices per provider and model; unknown models cost 0 and are logged once each."""

    def __init__(self, table: Mapping[str, Mapping[str, ModelPrice]] | None = None, *, source: str = "") -> None:
        self._table = {p: dict(models) for p, models in (table or {}).items()}
        self.source = source
        self._warned: set[tuple[str, str]] = set()

    @classmethod
    def from_data(cls, data: Any, *, source: str = "<data>") -> Pricing:
        """Build from ``{provider: {model: {input, cached_input, output}}}``; keys starting with _ are notes.

        Raises:
            DataFileError: the data does not have that shape.
        """
        if not isinstance(data, dict):
            raise DataFileError(source, "want a mapping provider -> model -> prices")
        table: dict[str, dict[str, ModelPrice]] = {}
        for provider, models in data.items():
            if str(provider).startswith("_"):
                continue
            if not isinstance(models, dict):
                raise DataFileError(source, f"key={provider}: want a mapping model -> prices")
            for model, price in models.items():
                where = f"key={provider}.{model}"
                if not isinstance(price, dict) or not {"input", "output"} <= price.keys():
                    raise DataFileError(source, f"{where}: want {{input, cached_input, output}}")
                unknown = price.keys() - {"input", "cached_input", "output"}
                if unknown:
                    raise DataFileError(source, f"{where}: unknown key {sorted(unknown)[0]}")
                values = [price["input"], price.get("cached_input", price["input"]), price["output"]]
                if not all(isinstance(v, int | float) and not isinstance(v, bool) and v >= 0 for v in values):
                    raise DataFileError(source, f"{where}: prices must be numbers >= 0")
                table.setdefault(str(provider), {})[str(model)] = ModelPrice(*(float(v) for v in values))
        return cls(table, source=source)

    @classmethod
    def load(cls, path: str | os.PathLike[str] | None = None, env: Mapping[str, str] = os.environ) -> Pricing:
        """The table at `path`, else ``MASSGEN_PRICING_FILE``, else the bundled example table.

        A missing bundled table (an installed, not checked-out, package) gives an empty table.

        Raises:
            DataFileError: an explicitly named file is missing or malformed.
        """
        named = path or env.get("MASSGEN_PRICING_FILE") or None
        if named is None:
            if not DEFAULT_PRICING_FILE.is_file():
                log.warning("pricing file=%s missing: every model costs 0", DEFAULT_PRICING_FILE)
                return cls(source="<empty>")
            named = DEFAULT_PRICING_FILE
        return cls.from_data(read_data_file(named), source=str(named))

    def price(self, provider: str, model: str) -> ModelPrice | None:
        """The price of `model`, trying its base name when it carries a date or version suffix."""
        models = self._table.get(provider)
        if not models:
            return None
        name = model.removeprefix("models/")
        while True:
            if name in models:
                return models[name]
            base = _VERSION_SUFFIX.sub("", name)
            if base == name:
                return None
            name = base

    def cost(self, provider: str, model: str, prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> float:
        """USD for one call; 0 for an unpriced model (warned about once per provider and model)."""
        price = self.price(provider, model)
        if price is None:
            if (provider, model) not in self._warned:
                self._warned.add((provider, model))
                log.warning(
                    "unpriced model provider=%s model=%s source=%s: cost counted as 0",
                    provider,
                    model,
                    self.source,
                )
            return 0.0
        return price.cost(prompt_tokens, completion_tokens, cached_tokens)

    def models(self, provider: str) -> list[str]:
        return sorted(self._table.get(provider, {}))
