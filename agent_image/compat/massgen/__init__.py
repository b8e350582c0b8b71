"""The part of MassGen's API that custom tool files import, for tools running in the sandbox."""
