"""``python -m swarmbus._mcp``: the ``mcp-agent-swarm`` console script."""

import sys

from swarmbus._mcp import main

sys.exit(main())
