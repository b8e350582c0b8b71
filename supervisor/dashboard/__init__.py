"""The operator's web dashboard (live, over server-sent events) and the one-file run report."""

from ._control import Control, LocalControl, StopRefused, SupervisorControl
from ._report import render_report, write_report
from ._server import CSP, Dashboard

__all__ = [
    "CSP",
    "Control",
    "Dashboard",
    "LocalControl",
    "StopRefused",
    "SupervisorControl",
    "render_report",
    "write_report",
]
