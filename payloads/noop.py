"""``wms-payload-noop``: does nothing and exits 0 at once (throughput benchmarks).

Arguments are accepted and ignored, so any task ``args`` work.
"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
