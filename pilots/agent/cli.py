"""``wms-pilot`` (and ``python -m pilots.agent``): parse the configuration, run the agent."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence

from pilots.agent import logs
from pilots.agent.config import ConfigError, check_payload_user, load
from pilots.agent.sandbox import make_undumpable

EXIT_CONFIG = 2


def main(argv: Sequence[str] | None = None) -> int:
    # before any secret is read: a payload of the same account must not read this process's
    # memory or /proc/<pid>/environ (Linux; a no-op elsewhere)
    make_undumpable()
    try:
        config, args = load(argv)
        if not args.print_config:
            check_payload_user(config, os.geteuid())
    except ConfigError as exc:
        print(f"wms-pilot: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.print_config:
        print(json.dumps(config.redacted(), indent=2, sort_keys=True))
        return 0
    logs.setup(config.log_level)
    from pilots.agent.agent import Agent  # kombu and psutil only when the pilot really runs

    return Agent(config).run()
