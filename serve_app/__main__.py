"""`python -m serve_app build-tiny`: build the tiny development pipelines into the cache."""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serve_app")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("build-tiny", help="build tiny-sd and tiny-flux into the local cache")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command == "build-tiny":
        from serve_app.engine.tiny import TINY_BUILDERS, ensure_tiny_model

        for name in TINY_BUILDERS:
            print(f"{name}: {ensure_tiny_model(name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
