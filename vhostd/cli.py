"""Command line: `vhostd serve` and `vhostd check`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from vhostd import __version__

DEFAULT_CONFIG = "config/vhostd.yaml"


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _load(path: str):
    from vhostd.config import ConfigError, load_config

    try:
        return load_config(path)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return None


def cmd_check(args) -> int:
    config = _load(args.config)
    if config is None:
        return 1
    print(f"{args.config}: ok ({len(config.devices)} device(s))")
    return 0


def cmd_serve(args) -> int:
    config = _load(args.config)
    if config is None:
        return 1
    _setup_logging(args.log_level or config.daemon.log_level)
    from vhostd.daemon import serve

    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a declared dependency
        runner = asyncio.run
    try:
        return runner(serve(config))
    except (OSError, ValueError) as exc:
        logging.getLogger("vhostd").error("cannot start: %s", exc)
        return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vhostd", description="vhost-user device back-end daemon")
    parser.add_argument("--version", action="version", version=f"vhostd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="serve the devices of a config file")
    p.add_argument("--config", "-c", default=DEFAULT_CONFIG)
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("check", help="validate a config file and exit")
    p.add_argument("--config", "-c", default=DEFAULT_CONFIG)
    p.set_defaults(func=cmd_check)

    args = parser.parse_args(argv)
    return args.func(args)
