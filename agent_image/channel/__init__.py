"""The run channel: one multiplexed byte stream between a sandbox and its supervisor.

Sandbox side only (stdlib; never imports the engine): `frames` is the wire format both sides
share, `hub` is the sandbox's end (it starts the engine, serves the API socket, replays the
outbox), `link` is the dumb pipe the supervisor runs through the engine's exec stream.
See docs/channel.md.
"""
