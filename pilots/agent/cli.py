"""``wms-pilot`` (and ``python -m pilots.agent``): parse the configuration, run the agent."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

from pilots.agent import logs
from pilots.agent.config import ConfigError, load

EXIT_CONFIG = 2


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config, args = load(argv)
    except ConfigError as exc:
        print(f"wms-pilot: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.print_config:
        print(json.dumps(config.redacted(), indent=2, sort_keys=True))
        return 0
    logs.setup(config.log_level)
    from pilots.agent.agent import Agent  # kombu and psutil only when the pilot really runs

    return Agent(config).run()
