"""An agent's in-memory todo list."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TodoItem:
    id: int
    text: str
    done: bool = False


class TodoList:
    """Numbered items, ids from 1, never reused."""

    def __init__(self) -> None:
        self._items: dict[int, TodoItem] = {}
        self._next_id = 1

    def add(self, text: str) -> TodoItem:
        item = TodoItem(self._next_id, text)
        self._items[item.id] = item
        self._next_id += 1
        return item

    def done(self, item_id: int) -> TodoItem:
        """Mark an item done (idempotent).

        Raises:
            KeyError: no item has this id.
        """
        item = self._items[item_id]
        item.done = True
        return item

    def ids(self) -> list[int]:
        return list(self._items)

    def counts(self) -> tuple[int, int]:
        """(open, done)."""
        finished = sum(item.done for item in self._items.values())
        return len(self._items) - finished, finished

    def render(self) -> str:
        """One line per item, `[ ] #1 text` or `[x] #1 text`; `(no todos)` when empty."""
        if not self._items:
            return "(no todos)"
        return "\n".join(f"[{'x' if item.done else ' '}] #{item.id} {item.text}" for item in self._items.values())
