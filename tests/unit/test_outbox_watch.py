"""The follower's wake-up source: one inotify watch, on the outbox folder until the events file is open, then on that file alone."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from supervisor.outbox_watch import OutboxWatch

pytestmark = pytest.mark.timeout(30)


async def _woken(wake: asyncio.Event, within: float = 1.0) -> bool:
    try:
        await asyncio.wait_for(wake.wait(), within)
    except TimeoutError:
        return False
    return True


async def _settle(wake: asyncio.Event) -> None:
    """Let pending inotify events arrive and be read, then clear the flag."""
    await asyncio.sleep(0.1)
    wake.clear()


def test_the_folder_is_watched_until_the_events_file_is_open(tmp_path: Path) -> None:
    """Before the events file exists, creating it wakes the follower."""

    async def main() -> None:
        wake = asyncio.Event()
        watch = OutboxWatch(tmp_path, wake)
        assert watch.start()
        try:
            assert not await _woken(wake, 0.2)
            (tmp_path / "events.jsonl").write_bytes(b"")
            assert await _woken(wake)
        finally:
            watch.close()

    asyncio.run(main())


def test_once_on_the_file_only_its_writes_wake_and_churn_around_it_does_not(tmp_path: Path) -> None:
    """After watch_file, thousands of files created and written next to the events file wake no one; one append does."""

    async def main() -> None:
        events = tmp_path / "events.jsonl"
        events.write_bytes(b"")
        wake = asyncio.Event()
        watch = OutboxWatch(tmp_path, wake)
        assert watch.start()
        fd = os.open(events, os.O_RDONLY)
        try:
            watch.watch_file(fd)
            assert watch.on_file and wake.is_set()  # one look right after switching
            await _settle(wake)
            for i in range(2000):
                (tmp_path / f"junk{i}").write_bytes(b"x")
            os.rename(tmp_path / "junk0", tmp_path / "moved")
            assert not await _woken(wake, 0.3)
            with open(events, "ab") as fh:
                fh.write(b"{}\n")
            assert await _woken(wake)
        finally:
            watch.close()
            os.close(fd)

    asyncio.run(main())


def test_the_watch_follows_the_open_inode_not_the_path(tmp_path: Path) -> None:
    """Replacing events.jsonl by a symlink or another file changes nothing: writes to the file held open still wake."""

    async def main() -> None:
        events = tmp_path / "events.jsonl"
        events.write_bytes(b"")
        wake = asyncio.Event()
        watch = OutboxWatch(tmp_path, wake)
        assert watch.start()
        fd = os.open(events, os.O_RDONLY)
        try:
            watch.watch_file(fd)
            await _settle(wake)
            os.rename(events, tmp_path / "held.jsonl")
            os.symlink(tmp_path / "elsewhere", events)
            await _settle(wake)
            (tmp_path / "elsewhere").write_bytes(b"not ours")
            assert not await _woken(wake, 0.3)
            with open(tmp_path / "held.jsonl", "ab") as fh:
                fh.write(b"{}\n")
            assert await _woken(wake)
        finally:
            watch.close()
            os.close(fd)

    asyncio.run(main())


def test_a_burst_of_writes_is_one_pending_flag(tmp_path: Path) -> None:
    """10^4 appends before the loop looks leave one set flag and a bounded read; nothing queues per event."""

    async def main() -> None:
        events = tmp_path / "events.jsonl"
        events.write_bytes(b"")
        wake = asyncio.Event()
        watch = OutboxWatch(tmp_path, wake)
        assert watch.start()
        fd = os.open(events, os.O_RDONLY)
        try:
            watch.watch_file(fd)
            await _settle(wake)
            with open(events, "ab", buffering=0) as fh:
                for _ in range(10_000):
                    fh.write(b"x")
            assert await _woken(wake)
            wake.clear()
            await asyncio.sleep(0.1)
            # identical queued events are merged by the kernel: at most a trickle is left
            assert not await _woken(wake, 0.3)
        finally:
            watch.close()
            os.close(fd)

    asyncio.run(main())


def test_close_is_idempotent_and_stops_wakeups(tmp_path: Path) -> None:
    """After close no more wake-ups come and a second close does nothing."""

    async def main() -> None:
        wake = asyncio.Event()
        watch = OutboxWatch(tmp_path, wake)
        assert watch.start()
        watch.close()
        watch.close()
        (tmp_path / "events.jsonl").write_bytes(b"")
        assert not await _woken(wake, 0.2)

    asyncio.run(main())
