"""``python -m sidecar`` is the same as the ``agent-authz`` command."""

from sidecar.cli import main

raise SystemExit(main())
