"""The ``pcigate`` command: wiring only.

Heavy imports live inside the commands: ``pcigate --help`` must stay fast.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from pcigate import __version__
from pcigate.commands import audit, connect, login, replay, requests, sessions, ssh, targets
from pcigate.config import DEFAULT_BROKER, ENV_BROKER, ENV_TOKEN_FILE, Settings

app = typer.Typer(
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


@app.callback()
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


app.command("login")(login.login)
app.command("logout")(login.logout)
app.command("whoami")(login.whoami)
app.command("targets")(targets.targets)
app.command("connect")(connect.connect)
app.command("ssh")(ssh.ssh)
app.add_typer(sessions.app, name="sessions")
app.command("replay")(replay.replay)
app.command("request")(requests.request)
app.command("requests")(requests.list_requests)
app.command("approve")(requests.approve)
app.command("deny")(requests.deny)
app.command("cancel")(requests.cancel)
app.command("revoke")(requests.revoke)
app.add_typer(audit.app, name="audit")


def main() -> None:
    import os

    from pcigate import startup
    from pcigate.errors import ExitCode, PcigateError

    startup.begin()  # until the command says its start-up is over (connect: tunnel ready) or returns
    if os.environ.get("_PCIGATE_COMPLETE"):  # shell completion: register typer's bash/zsh/fish classes
        from typer._completion_classes import completion_init

        completion_init()
    try:
        app(prog_name="pcigate")
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
        sys.stderr.write(f"error: internal error: {type(exc).__name__}: {exc}\n")
        sys.stderr.write("hint: set PCIGATE_DEBUG=1 to see the traceback\n")
        sys.exit(int(ExitCode.ERROR))
    finally:
        startup.end()
