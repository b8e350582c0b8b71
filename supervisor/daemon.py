"""`massgen-supervisor`: the long-running daemon (not built yet; massgen-run embeds a supervisor)."""

from __future__ import annotations

import sys


def main() -> int:
    print(
        "massgen-supervisor: the daemon is not implemented yet; massgen-run runs an embedded supervisor",
        file=sys.stderr,
    )
    return 1
