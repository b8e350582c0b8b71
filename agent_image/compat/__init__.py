"""Modules that tool workers import in place of other projects' packages (never the engine)."""
