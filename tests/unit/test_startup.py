"""Start-up of the CLI process: GC deferral, skipped modules, background imports, what the connect path loads
before its broker call, and the light claims reader used to schedule a refresh."""

from __future__ import annotations

import base64
import gc
import json
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pcigate import startup
from pcigate.auth import credentials
from pcigate.auth.credentials import REFRESH_MARGIN_SECONDS, refresh_margin
from pcigate.auth.tokens import StoredTokens


@pytest.fixture
def gc_restored() -> Iterator[None]:
    enabled = gc.isenabled()
    yield
    startup.end()
    gc.unfreeze()
    (gc.enable if enabled else gc.disable)()


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


def run_started(code: str) -> str:
    """What ``code`` prints in a new interpreter after the CLI's start-up settings (``startup.begin()``;
    ``sys`` is imported); it must succeed."""
    proc = run_python("import sys\nfrom pcigate import startup\nstartup.begin()\n" + code)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_begin_defers_gc_until_end(gc_restored: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(startup, "UNUSED_MODULES", ())
    gc.enable()
    startup.begin()
    assert not gc.isenabled()
    startup.end()
    assert gc.isenabled()
    assert gc.get_freeze_count() > 0  # what start-up allocated is not rescanned
    startup.end()  # idempotent
    assert gc.isenabled()


def test_end_without_begin_leaves_gc_alone(gc_restored: None) -> None:
    gc.disable()
    startup.end()
    assert not gc.isenabled()  # nobody asked for the deferral: not ours to turn on


def test_begin_makes_unused_modules_unimportable(gc_restored: None, monkeypatch: pytest.MonkeyPatch) -> None:
    name = "pcigate_test_never_imported_module"
    monkeypatch.setattr(startup, "UNUSED_MODULES", (name,))
    monkeypatch.delitem(sys.modules, name, raising=False)
    startup.begin()
    try:
        with pytest.raises(ImportError):
            __import__(name)
    finally:
        del sys.modules[name]


def test_httpx_works_without_its_cli_and_skips_rich() -> None:
    out = run_started(
        "import httpx\n"
        "from pcigate.client import BrokerClient\n"
        "BrokerClient('http://127.0.0.1:1').close()\n"
        "print(sorted(m for m in ('rich', 'click', 'pygments') if m in sys.modules))\n"
    )
    assert out.strip() == "[]"


def test_prefetch_imports_in_the_background_and_waits_for_it(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[str, bool]] = []

    def fake_import(name: str) -> object:
        seen.append((name, threading.current_thread() is threading.main_thread()))
        if name == "broken":
            raise ImportError(name)
        return object()

    monkeypatch.setattr(startup.importlib, "import_module", fake_import)
    interval = sys.getswitchinterval()
    with startup.Prefetch(["broken", "fine"]):
        assert sys.getswitchinterval() == startup.Prefetch.SWITCH_INTERVAL
    assert seen == [("broken", False), ("fine", False)]  # a failure does not stop the rest
    assert sys.getswitchinterval() == interval


def test_prefetch_waits_and_restores_on_an_error() -> None:
    interval = sys.getswitchinterval()
    prefetch = startup.Prefetch(["json"])
    with pytest.raises(RuntimeError), prefetch:
        raise RuntimeError("the broker call failed")
    assert not prefetch._thread.is_alive()
    assert sys.getswitchinterval() == interval


def test_connect_loads_neither_the_tunnel_nor_rich_before_its_broker_call() -> None:
    out = run_started(
        "import pcigate.app, pcigate.session, pcigate.client, pcigate.auth.credentials, pcigate.spool\n"
        "heavy = ('rich', 'pglast', 'uvloop', 'pcigate.tunnel.pg', 'pcigate.recording', 'pcigate.output',\n"
        "         'keyring', 'authlib', 'joserfc', 'cryptography', 'importlib.metadata')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    assert out.strip() == "[]"


def test_importing_the_broker_client_builds_no_type_adapter() -> None:
    # a module-level TypeAdapter (list[TargetInfo]) builds its schema at import, ~7 ms of connect's start-up
    # for a model connect never reads; the client makes such adapters on first use
    out = run_started(
        "import pcigate.client, pcigate.models\n"
        "from pydantic import TypeAdapter\n"
        "print([n for mod in (pcigate.client, pcigate.models) for n, v in vars(mod).items()\n"
        "       if isinstance(v, TypeAdapter)])\n"
    )
    assert out.strip() == "[]"


def test_the_tunnel_loads_the_sql_tracer_only_for_column_rules() -> None:
    # pcigate.sqltaint (~3 ms) is imported by a session whose masking policy has column rules; the tunnel's
    # import runs during connect's broker call, where every ms of CPU delays the answer's handling
    out = run_started("import pcigate.tunnel.pg\nprint('pcigate.sqltaint' in sys.modules)\n")
    assert out.strip() == "False"


# -- the claims reader that schedules refreshes -------------------------------------------------------------


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwt(payload: object, header: object | None = None) -> str:
    head = {"alg": "RS256", "typ": "JWT"} if header is None else header
    return f"{b64(json.dumps(head).encode())}.{b64(json.dumps(payload).encode())}.{b64(b'signature')}"


def tokens(id_token: str) -> StoredTokens:
    return StoredTokens(id_token=id_token, expires_at=0)


def test_refresh_margin_from_the_token_lifetime() -> None:
    assert refresh_margin(tokens(jwt({"iat": 1000, "exp": 1090}))) == 30  # a third of a short lifetime
    assert refresh_margin(tokens(jwt({"iat": 1000, "exp": 5000}))) == REFRESH_MARGIN_SECONDS
    assert refresh_margin(tokens(jwt({"iat": 1000.5, "exp": 1030.5}))) == 10


@pytest.mark.parametrize(
    "id_token",
    [
        "",
        "abc",
        "a.b",
        "a.b.c.d",
        "!!!.???.sig",
        jwt({"iat": 1, "exp": 2}, header={"typ": "JWT"}),  # no alg
        jwt({"iat": 1, "exp": 2}, header=["alg"]),
        jwt([1, 2]),
        jwt({"iat": "1", "exp": "90"}),
        jwt({"iat": 90, "exp": 1}),
        b64(b'{"alg": "RS256"}') + "." + b64(b"\xff\xfe") + ".sig",  # payload not UTF-8
        "é.é.é",
    ],
)
def test_refresh_margin_of_an_unreadable_token_is_the_default(id_token: str) -> None:
    assert refresh_margin(tokens(id_token)) == REFRESH_MARGIN_SECONDS


@given(iat=st.integers(0, 2**40), lifetime=st.integers(1, 10**6), extra=st.dictionaries(st.text(), st.text()))
def test_claims_agree_with_the_jose_reader(iat: int, lifetime: int, extra: dict[str, str]) -> None:
    from pcigate.auth.oidc import id_token_claims

    token = jwt({**extra, "iat": iat, "exp": iat + lifetime})
    assert credentials._unverified_claims(token) == id_token_claims(token)


@given(st.text())
def test_claims_reader_never_raises(text: str) -> None:
    claims = credentials._unverified_claims(text)
    assert claims is None or isinstance(claims, dict)


def test_tls_context_only_skips_the_ca_bundle_for_plain_http() -> None:
    import ssl

    from pcigate.client import _tls_context

    ctx = _tls_context("http://127.0.0.1:8600")
    assert isinstance(ctx, ssl.SSLContext)
    # never used; it would verify and trust nothing
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.check_hostname
    assert ctx.cert_store_stats()["x509_ca"] == 0
    assert _tls_context("https://pcigate.example.com") is True  # httpx's default: the CA bundle


def test_models_work_without_pydantics_plugin_loader() -> None:
    """The connect path builds and uses pydantic models without importing the plugin loader (and with it
    importlib.metadata and the email package)."""
    out = run_started(
        "import pydantic\n"
        "from pcigate.models import DatabaseCredentials\n"
        "class M(pydantic.BaseModel):\n"
        "    x: int\n"
        "assert M(x='3').x == 3\n"
        "c = DatabaseCredentials(host='h', port=5432, database='d', username='u', password='p', "
        "sslmode='disable')\n"
        "print(c.port, 'importlib.metadata' in sys.modules, sys.modules['pydantic.plugin._loader'].__file__ "
        "if hasattr(sys.modules['pydantic.plugin._loader'], '__file__') else 'stand-in')\n"
    )
    assert out.split() == ["5432", "False", "stand-in"]


def test_plugins_the_user_enables_still_load(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYDANTIC_DISABLE_PLUGINS", "some_plugin")  # plugins on, one of them off
    out = run_started(
        "import pydantic\n"
        "class M(pydantic.BaseModel):\n"
        "    x: int\n"
        "print(hasattr(sys.modules['pydantic.plugin._loader'], '__file__'))\n"
    )
    assert out.strip() == "True"


def test_pydantic_asks_the_plugin_loader_only_for_get_plugins() -> None:
    """The stand-in has only ``get_plugins``: if a pydantic upgrade imports anything else from the loader,
    this fails before the CLI would."""
    import ast
    from pathlib import Path

    import pydantic

    asked: set[str] = set()
    for path in Path(pydantic.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").endswith("_loader"):
                asked.update(a.name for a in node.names)
            elif isinstance(node, ast.Import | ast.ImportFrom):  # the module itself, not a name from it
                names = [a.name for a in node.names]
                assert not any(n.endswith("_loader") for n in names), (path, names)
    assert asked == {"get_plugins"}
