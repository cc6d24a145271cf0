"""The ``pcigate`` command: wiring only.

Heavy imports live inside the commands: ``pcigate --help`` must stay fast.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from pcigate import __version__, startup
from pcigate.commands import audit, connect, login, replay, requests, sessions, ssh, targets
from pcigate.config import DEFAULT_BROKER, ENV_BROKER, ENV_TOKEN_FILE, Settings


def _new_app() -> typer.Typer:
    return typer.Typer(
        name="pcigate",
        help="Just-in-time, recorded access to card-data databases.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        rich_markup_mode=None,  # plain click help: rich (+ markdown-it) would cost ~90 ms on every --help
        context_settings={"help_option_names": ["-h", "--help"]},
    )


def _version(value: bool) -> None:
    if value:
        sys.stdout.write(f"pcigate {__version__}\n")
        raise typer.Exit()


def root(
    ctx: typer.Context,
    broker: Annotated[
        str, typer.Option("--broker", envvar=ENV_BROKER, help="Broker URL.", show_default=True)
    ] = DEFAULT_BROKER,
    token_file: Annotated[
        Path | None,
        typer.Option(
            "--token-file",
            envvar=ENV_TOKEN_FILE,
            help="A file holding a workload OIDC token (or set PCIGATE_TOKEN to the token itself).",
            dir_okay=False,
        ),
    ] = None,
    json_flag: Annotated[bool, typer.Option("--json", help="Print results as JSON.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = False,
) -> None:
    """Just-in-time, recorded access to card-data databases."""
    ctx.obj = Settings(broker=broker, token_file=token_file, json=json_flag)


# The commands, in --help order: a name maps to a command function or to a sub-app (sessions, audit).
COMMANDS: dict[str, Callable[..., None] | typer.Typer] = {
    "login": login.login,
    "logout": login.logout,
    "whoami": login.whoami,
    "targets": targets.targets,
    "connect": connect.connect,
    "ssh": ssh.ssh,
    "sessions": sessions.app,
    "replay": replay.replay,
    "request": requests.request,
    "requests": requests.list_requests,
    "approve": requests.approve,
    "deny": requests.deny,
    "cancel": requests.cancel,
    "revoke": requests.revoke,
    "audit": audit.app,
}


def build(only: str | None = None) -> typer.Typer:
    """The ``pcigate`` app: every command, or with ``only`` the root options and that one command.

    Running a command builds click objects (and, for the invoked command, pydantic type adapters) for every
    command the app holds: ~20 ms for all of them on the reference machine, before any of the command's own
    code runs. :func:`main` builds just the invoked one; its help, options and errors are the same."""
    new = _new_app()
    new.callback()(root)
    for name, cmd in COMMANDS.items():
        if only is not None and name != only:
            continue
        if isinstance(cmd, typer.Typer):
            new.add_typer(cmd, name=name)
        else:
            new.command(name)(cmd)
    return new


def invoked_command(args: list[str]) -> str | None:
    """The command ``args`` (``sys.argv[1:]``) run, when that is certain without parsing them; else None
    (help, completion, an unknown name: the whole app answers those)."""
    from pcigate.resident import first_command

    name = first_command(args)
    return name if name in COMMANDS else None


app = build()


def main() -> None:
    import os

    from pcigate.errors import ExitCode, PcigateError

    startup.begin()  # until the command says its start-up is over (connect: tunnel ready) or returns
    if os.environ.get("_PCIGATE_COMPLETE"):  # shell completion: register typer's bash/zsh/fish classes
        from typer._completion_classes import completion_init

        completion_init()
    try:
        only = None if os.environ.get("_PCIGATE_COMPLETE") else invoked_command(sys.argv[1:])
        (build(only) if only else app)(prog_name="pcigate")
    except PcigateError as exc:
        sys.stderr.write(f"error: {exc.message}\n")
        if exc.hint:
            sys.stderr.write(f"hint: {exc.hint}\n")
        sys.exit(int(exc.exit_code))
    except KeyboardInterrupt:
        sys.stderr.write("\n")
        sys.exit(int(ExitCode.INTERRUPTED))
    except Exception as exc:  # a bug: one line, no traceback (PCIGATE_DEBUG=1 shows it)
        if os.environ.get("PCIGATE_DEBUG"):
            raise
        core = sys.modules.get("pydantic_core")
        if core is not None and isinstance(exc, core.ValidationError):
            # a request model refused the command's arguments (e.g. a 200-character target name): what the
            # broker, the IdP, the keyring and the spool return is validated, and reported, where it is read
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or exc.title
            sys.stderr.write(f"error: invalid {where}: {first['msg']}\n")
            sys.exit(int(ExitCode.USAGE))
        text = " ".join(str(exc).split())[:300]  # one line, whatever the exception's text holds
        sys.stderr.write(f"error: internal error: {type(exc).__name__}: {text}\n")
        sys.stderr.write("hint: set PCIGATE_DEBUG=1 to see the traceback\n")
        sys.exit(int(ExitCode.ERROR))
    finally:
        startup.end()
