"""`python -m agent_image run-spec SPEC` runs the engine; anything else is the in-sandbox CLI."""

import gc
import os
import sys

if sys.argv[1:2] == ["run-spec"]:
    # Start-up only allocates what lives as long as the process (modules, classes: pydantic and
    # the model SDKs make thousands), so collecting during it is wasted work: about a fifth of
    # the import CPU, paid by every sandbox. The engine freezes them and re-enables collection
    # once its backends are built (engine.main.startup_done).
    gc.disable()

from .engine.main import main  # after gc.disable: it must precede the imports

code = main()
if sys.argv[1:2] == ["run-spec"]:
    # The outcome is written and the event file closed: skip the interpreter's teardown, which
    # takes ~0.1 s once the mcp SDK's thousands of pydantic objects are loaded (a run's end waits
    # for it). Every child (tool workers, MCP servers) was stopped by the engine already.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
