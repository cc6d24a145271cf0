"""What the CLI process does about its own start-up cost (docs/performance.md, "Connect and start-up").

Most of the time ``pcigate connect`` spends before its tunnel is ready is CPython importing typer, pydantic,
httpx, asyncio, the tunnel and pglast. Three things here cut or hide some of it (used by ``app.main`` and
``connect``):

* :func:`begin` / :func:`end`: no cyclic garbage collection while the process starts. Imports create hundreds
  of thousands of long-lived objects (classes, functions, schemas) and no garbage cycles worth finding, yet
  each growth of the heap by a quarter triggers a full collection over all of it (~20 % of start-up). When
  start-up is over, :func:`end` moves what exists to the permanent generation (:func:`gc.freeze`) and turns
  collection back on, so a long session never rescans them.
* :func:`begin` also tells the import system that httpx's own command-line client (``httpx._main``: click,
  rich, pygments) is unavailable; ``import httpx`` then skips it (httpx handles exactly that ImportError).
* :class:`Prefetch`: imports modules in a background thread while the main thread waits for the network
  (the GIL is free then), e.g. the tunnel's while the broker and OpenBao mint the session's credentials.

:func:`mark` tells where that time goes: with ``PCIGATE_TRACE_STARTUP=1`` in the environment, each phase of
``connect``'s start-up writes a line on stderr (tests/benchmarks/bench_connect.py reads them).

stdlib only: imported on the ``--help`` path.
"""

from __future__ import annotations

import gc
import importlib
import os
import sys
import threading
import time
import types
from collections.abc import Callable, Iterable
from types import TracebackType

# Modules of dependencies the CLI never runs but would import: None in sys.modules makes importing them raise
# ImportError, which their importers handle.
UNUSED_MODULES = ("httpx._main",)

_gc_deferred = False

TRACE_ENV = "PCIGATE_TRACE_STARTUP"
TRACE_PREFIX = "pcigate-startup"
_ready: list[Callable[[], None]] = []


def mark(phase: str) -> None:
    """With ``PCIGATE_TRACE_STARTUP=1``: ``pcigate-startup PHASE MS`` on stderr, MS the CLOCK_MONOTONIC time
    in milliseconds (the clock every process shares, so a parent can subtract the time it spawned us). The
    environment is read each time: a warm-start worker (:mod:`pcigate.resident`) gets its client's."""
    if os.environ.get(TRACE_ENV) == "1":
        sys.stderr.write(f"{TRACE_PREFIX} {phase} {time.monotonic() * 1000.0:.3f}\n")
        sys.stderr.flush()

# pydantic looks for plugins (get_plugins()) in this module, whose own import costs ~11 ms (importlib.metadata
# and the email package, for an entry-point scan that PYDANTIC_DISABLE_PLUGINS then skips anyway).
_PYDANTIC_PLUGIN_LOADER = "pydantic.plugin._loader"


def _no_pydantic_plugins() -> types.ModuleType:
    """Stands in for :data:`_PYDANTIC_PLUGIN_LOADER` when plugins are disabled: the same ``get_plugins``
    answer (none), without the import. tests/unit/test_startup.py checks pydantic still asks only that."""
    mod = types.ModuleType(_PYDANTIC_PLUGIN_LOADER)
    mod.get_plugins = lambda: ()  # type: ignore[attr-defined]
    return mod


def begin() -> None:
    """Start-up of the CLI process: no cyclic GC until :func:`end`; skip :data:`UNUSED_MODULES`; no pydantic
    plugins (looking for them scans every installed distribution's entry points, ~8 ms, and the CLI uses
    none), and not even the module that would look (unless the user's environment enables plugins)."""
    global _gc_deferred
    for name in UNUSED_MODULES:
        sys.modules.setdefault(name, None)  # type: ignore[arg-type]  # None: "not importable"
    os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")
    if os.environ["PYDANTIC_DISABLE_PLUGINS"] == "__all__":
        sys.modules.setdefault(_PYDANTIC_PLUGIN_LOADER, _no_pydantic_plugins())
    if gc.isenabled():
        gc.disable()
        _gc_deferred = True


def when_ready(action: Callable[[], None]) -> None:
    """Run ``action`` at the first :func:`end` (e.g. start a warm-start helper once the tunnel is ready)."""
    _ready.append(action)


def end() -> None:
    """Start-up is over (idempotent): freeze what it allocated, and collect garbage again from now on; then
    the :func:`when_ready` actions."""
    global _gc_deferred
    while _ready:
        _ready.pop(0)()
    if _gc_deferred:
        _gc_deferred = False
        gc.freeze()
        gc.enable()


class Prefetch:
    """``with Prefetch(modules):`` imports ``modules`` in a daemon thread meanwhile; leaving the block waits
    for it. Failures are ignored: the code that needs a module imports it again and meets the error then.

    Only the main thread's network wait should run inside the block: an import there would compete for the
    GIL (and for the modules' import locks) with the thread's."""

    # Meanwhile the main thread gets the GIL back within this long (not the default 5 ms) each time a socket
    # call of its request returns.
    SWITCH_INTERVAL = 0.0005

    def __init__(self, modules: Iterable[str]) -> None:
        self.modules = tuple(modules)
        self._thread = threading.Thread(target=self._run, name="pcigate-prefetch", daemon=True)
        self._switch_interval = sys.getswitchinterval()

    def _run(self) -> None:
        for name in self.modules:
            try:
                importlib.import_module(name)
            except Exception:  # noqa: S112 - see the class docstring
                continue

    def __enter__(self) -> Prefetch:
        sys.setswitchinterval(self.SWITCH_INTERVAL)
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            self._thread.join()
        finally:
            sys.setswitchinterval(self._switch_interval)
