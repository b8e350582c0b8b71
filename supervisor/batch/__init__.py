"""Batch experiments: configs x questions x repeats, each item its own run; resumable, gated, reported.

`spec` (batch.yaml, items and their ids), `ledger` (items.jsonl), `assertions` and `grading`
(verdicts), `stats`, `reports` (summary.json/.md, junit.xml, gates, exit codes), `backends`
(daemon or embedded supervisor), `runner` (scheduling, retries, deadline, budget), `cli`.
"""

from .ledger import ItemState, Ledger
from .reports import BatchExit, ReportSpec, summarize
from .spec import Batch, Item, SpecError, load_batch

__all__ = ["Batch", "BatchExit", "Item", "ItemState", "Ledger", "ReportSpec", "SpecError", "load_batch", "summarize"]
