"""``pcigate login``, ``logout``, ``whoami``."""

from __future__ import annotations

from typing import Annotated

import typer

from pcigate.commands._common import JsonOpt, broker, output, settings
from pcigate.config import check_broker_url


def login(
    ctx: typer.Context,
    device: Annotated[
        bool, typer.Option("--device", help="Use the device flow (sign in on another device).")
    ] = False,
    no_browser: Annotated[
        bool, typer.Option("--no-browser", help="Do not open a browser; only print the sign-in URL.")
    ] = False,
    json_flag: JsonOpt = False,
) -> None:
    """Sign in with your identity provider.

    A browser sign-in (authorization code + PKCE, loopback redirect), or with --device the device flow
    (sign in on another device). The tokens are kept in the OS keyring.
    """
    from pcigate.auth import oidc
    from pcigate.auth.tokens import TokenStore, _usable_keyring

    out = output(ctx, json_flag)
    s = settings(ctx)
    check_broker_url(s.broker_url)
    store = TokenStore(s.broker_url)
    _usable_keyring()  # fail before the user signs in, not after
    with broker(ctx, authenticated=False) as anon:
        provider = oidc.discover(anon.oidc_config())
    if device:
        tokens = oidc.login_device(provider, announce=out.info)
    else:
        tokens = oidc.login_auth_code(provider, announce=out.info, open_browser=not no_browser)
    store.save(tokens)
    with broker(ctx) as client:
        identity = client.whoami()
    if out.json_mode:
        out.json(identity)
    else:
        groups = ", ".join(identity.groups) or "no groups"
        out.info(f"signed in to {s.broker_url} as {identity.name or identity.subject} ({groups})")


def logout(ctx: typer.Context, json_flag: JsonOpt = False) -> None:
    """Sign out: forget the sign-in and revoke its refresh token."""
    from pcigate.auth import oidc
    from pcigate.auth.tokens import TokenStore
    from pcigate.errors import AuthRequired, PcigateError

    out = output(ctx, json_flag)
    s = settings(ctx)
    check_broker_url(s.broker_url)
    store = TokenStore(s.broker_url)
    tokens = store.load()
    revoked = False
    if tokens is not None and tokens.refresh_token:
        try:
            with broker(ctx, authenticated=False) as anon:
                config = anon.oidc_config()
            oidc.check_same_provider(tokens, config)  # never send the refresh token to another provider
            revoked = oidc.revoke(oidc.discover(config), tokens.refresh_token)
        except AuthRequired as exc:
            out.warn(f"the refresh token was not revoked: {exc.message}")
            revoked = False
        except PcigateError:
            revoked = False
    removed = store.delete()
    if out.json_mode:
        out.json({"broker": s.broker_url, "signed_out": removed, "refresh_token_revoked": revoked})
    elif removed:
        out.info(f"signed out of {s.broker_url}" + ("; refresh token revoked" if revoked else ""))
    else:
        out.info(f"not signed in to {s.broker_url}")


def whoami(ctx: typer.Context, json_flag: JsonOpt = False) -> None:
    """Show who the broker thinks you are."""
    out = output(ctx, json_flag)
    with broker(ctx) as client:
        identity = client.whoami()
    out.record(
        identity,
        [
            ("subject", lambda i: i.subject),
            ("name", lambda i: i.name),
            ("email", lambda i: i.email),
            ("groups", lambda i: i.groups),
            ("kind", lambda i: i.client_kind),
            ("issuer", lambda i: i.issuer),
            ("expires", lambda i: i.expires_at),
        ],
    )
