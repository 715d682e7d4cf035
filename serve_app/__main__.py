"""`python -m serve_app build-tiny | validate FILE... | run [CONFIG]`

- `build-tiny`: build the tiny development pipelines into the cache.
- `validate`: check serve config files (Serve's schema, our app args, every model YAML and
  every deployment option) and model YAML files, without loading any weights. Exits 1 and
  names the file and the field at the first problem in each file.
- `run`: `serve run CONFIG` plus one line when every model is ready (serve_app/launcher.py).
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serve_app")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("build-tiny", help="build the tiny pipelines into the local cache")
    validate = commands.add_parser("validate", help="check serve configs and model YAMLs (no weights loaded)")
    validate.add_argument("files", nargs="+", type=Path, help="serve config files and/or models/*.yaml")
    run = commands.add_parser("run", help="serve run CONFIG, and say when every model is ready")
    run.add_argument("config", nargs="?", type=Path, default=Path("serve_config.yaml"), help="serve config file")
    args = parser.parse_args(argv)
    if args.command == "run":
        from serve_app.launcher import run as run_serve

        return run_serve(args.config)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command == "build-tiny":
        from serve_app.engine.tiny import TINY_BUILDERS, ensure_tiny_model

        for name in TINY_BUILDERS:
            print(f"{name}: {ensure_tiny_model(name)}")
        return 0
    from serve_app.validate import validate_file

    failed = 0
    for path in args.files:
        with warnings.catch_warnings(record=True) as caught:  # deprecations: named with the file
            warnings.simplefilter("always")
            try:
                print(f"ok: {path}: {validate_file(path)}")
            except ValueError as exc:
                failed += 1
                print(f"error: {exc}", file=sys.stderr)
        for warning in caught:
            print(f"warning: {path}: {warning.message}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
