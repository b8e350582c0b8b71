"""The supervisor's end of the run channel (docs/channel.md): one stream per linked sandbox.

`session.ChannelSession` keeps a run's link up (redialling through the runtime's exec stream),
mirrors the sandbox's outbox into the log dir, bridges the sandbox's API socket to the run's
own host socket, and moves files in and out.
"""

from .session import ChannelLost, ChannelSession, TransferError

__all__ = ["ChannelLost", "ChannelSession", "TransferError"]
