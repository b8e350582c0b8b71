"""`python -m agent_image run-spec SPEC` runs the engine; anything else is the in-sandbox CLI."""

import sys

from .engine.main import main

sys.exit(main())
