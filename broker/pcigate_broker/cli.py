"""``pcigate-broker``: ``serve``, ``migrate``, ``check-config`` (argparse; heavy imports only once needed).

A bad configuration prints one line per problem naming the key and exits 2, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_CONFIG = 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pcigate-broker", description="pcigate access broker")
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in (
        ("serve", "run the HTTP broker (applies migrations first, runs the reaper)"),
        ("migrate", "bring the database schema up to date"),
        ("check-config", "validate broker.toml and exit"),
    ):
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("--config", "-c", required=True, help="path to broker.toml")
        if name == "serve":
            sp.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def _err(msg: str) -> None:
    sys.stderr.write(msg + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from .settings import ConfigError, load_settings

    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        for problem in exc.problems:
            _err(f"config error: {problem}")
        return EXIT_CONFIG
    if args.command == "check-config":
        sys.stdout.write(
            f"{args.config}: ok ({len(settings.targets)} target(s), {len(settings.access)} rule(s))\n"
        )
        return EXIT_OK

    from .store.db import make_engine, upgrade

    try:
        engine = make_engine(settings.storage.database_url)
        try:
            upgrade(engine)
        finally:
            engine.dispose()
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        _err(f"error: database migration failed: {type(exc).__name__}: {first}")
        return EXIT_ERROR
    if args.command == "migrate":
        sys.stdout.write("database schema is up to date\n")
        return EXIT_OK

    import uvicorn

    from .app import create_app

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    s = settings.server
    settings.storage.recordings_dir.mkdir(parents=True, exist_ok=True)
    try:
        app = create_app(settings)
    except ConfigError as exc:
        for problem in exc.problems:
            _err(f"config error: {problem}")
        return EXIT_CONFIG
    uvicorn.run(
        app,
        host=s.host,
        port=s.port,
        log_level=args.log_level,
        ssl_certfile=str(s.tls_cert_file) if s.tls_cert_file else None,
        ssl_keyfile=str(s.tls_key_file) if s.tls_key_file else None,
        proxy_headers=False,
        server_header=False,
    )
    return EXIT_OK


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
