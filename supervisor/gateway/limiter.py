"""One backoff per upstream host, shared by every run of a supervisor (a batch's runs, the daemon's).

Each gateway retries its own calls; without a shared pause, 32 runs hitting a rate-limited
upstream would each learn of the 429 separately and keep hammering it. Once one call is
answered 429, every call to that host waits until the wait it was given (its Retry-After, or
the backoff) has passed.
"""

from __future__ import annotations

import asyncio
import time

MAX_PAUSE_S = 60.0  # a Retry-After beyond this is not honoured for everyone at once


class UpstreamLimiter:
    """Pauses per upstream host; `wait` before sending, `pause` on a 429."""

    def __init__(self) -> None:
        self._until: dict[str, float] = {}

    def pause(self, host: str, seconds: float) -> None:
        """Hold every call to `host` for `seconds` from now (extends, never shortens, a pause)."""
        until = time.monotonic() + min(max(seconds, 0.0), MAX_PAUSE_S)
        if until > self._until.get(host, 0.0):
            self._until[host] = until

    def remaining(self, host: str) -> float:
        """Seconds until `host` may be called again (0 when it may now)."""
        return max(0.0, self._until.get(host, 0.0) - time.monotonic())

    async def wait(self, host: str) -> float:
        """Sleep while `host` is paused; returns the seconds waited."""
        waited = 0.0
        while (left := self.remaining(host)) > 0:
            await asyncio.sleep(left)
            waited += left
        return waited
