"""``python -m workers``: the command line the supervisor starts one worker process with.

Kept apart from :mod:`workers.runtime` so that importing the runtime (in tests, or to embed
it) has no side effects: argument parsing and logging set-up happen only here.
"""

from __future__ import annotations

import argparse
import sys

from workers import proctitle, runtime


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m workers",
        description="Lemonade worker: serves one model to the supervisor over a Unix socket.",
    )
    parser.add_argument("--socket", required=True, help="Unix socket the supervisor listens on, or tcp:HOST:PORT (a worker "
                             "on a cluster node; its secret comes in LEMONADE_WORKER_TOKEN)")
    parser.add_argument("--kind", required=True, help="worker kind (see workers.registry)")
    parser.add_argument(
        "--parent-pid", required=True, type=int, help="pid of the supervisor that started us"
    )
    parser.add_argument(
        "--max-threads",
        type=_positive_int,
        default=runtime.DEFAULT_MAX_THREADS,
        help="threads for model calls (default %(default)s)",
    )
    return parser.parse_args(argv)


def cli(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    proctitle.worker(None, args.kind)  # the model's name comes with the load request
    runtime.setup_logging()
    return runtime.main(
        socket_path=args.socket,
        kind=args.kind,
        parent_pid=args.parent_pid,
        max_threads=args.max_threads,
    )


if __name__ == "__main__":
    sys.exit(cli())
