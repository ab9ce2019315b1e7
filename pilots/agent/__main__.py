"""``python -m pilots.agent``: the same as the ``wms-pilot`` console script."""

from pilots.agent.cli import main

raise SystemExit(main())
