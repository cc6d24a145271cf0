"""The one output toolkit: results on stdout (rich table or ``--json``), messages on stderr.

Commands build pydantic models and hand them here; nothing else in the CLI prints.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

if TYPE_CHECKING:
    from rich.console import Console, RenderableType

Column = tuple[str, Callable[[Any], object]]


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if hasattr(value, "isoformat"):
        text: str = value.isoformat(timespec="seconds")
        return text.replace("+00:00", "Z")
    if isinstance(value, list | tuple):
        return ", ".join(_cell(v) for v in value) or "-"
    return str(value)


def _getter(name: str) -> Callable[[Any], object]:
    return lambda m: getattr(m, name)


class Output:
    def __init__(self, *, json_mode: bool = False) -> None:
        self.json_mode = json_mode
        self._out: Console | None = None
        self._err: Console | None = None

    # rich is imported on first use: `connect` prints one line before its tunnel is ready
    @property
    def out(self) -> Console:
        if self._out is None:
            from rich.console import Console

            self._out = Console(highlight=False, soft_wrap=False)
        return self._out

    @property
    def err(self) -> Console:
        if self._err is None:
            from rich.console import Console

            self._err = Console(stderr=True, highlight=False, soft_wrap=True)
        return self._err

    # results -----------------------------------------------------------------------------------------------
    def json(self, data: BaseModel | Sequence[BaseModel] | dict[str, Any] | list[Any]) -> None:
        if isinstance(data, BaseModel):
            payload: Any = data.model_dump(mode="json")
        elif isinstance(data, dict):
            payload = data
        else:
            payload = [d.model_dump(mode="json") if isinstance(d, BaseModel) else d for d in data]
        sys.stdout.write(json.dumps(payload, indent=2, sort_keys=False) + "\n")
        sys.stdout.flush()

    def table(
        self, rows: Sequence[BaseModel], columns: Sequence[Column], *, title: str | None = None
    ) -> None:
        """A list of models: a rich table in human mode, a JSON array with ``--json``."""
        if self.json_mode:
            self.json(rows)
            return
        if not rows:
            self.info(f"no {title or 'results'}")
            return
        from rich.table import Table

        table = Table(show_edge=False, header_style="bold", pad_edge=False)
        for header, _ in columns:
            table.add_column(header, overflow="fold")
        for row in rows:
            table.add_row(*(_cell(getter(row)) for _, getter in columns))
        self.out.print(table)

    def record(self, model: BaseModel, fields: Sequence[Column] | None = None) -> None:
        """One model: ``key  value`` lines in human mode, a JSON object with ``--json``."""
        if self.json_mode:
            self.json(model)
            return
        if fields is None:
            fields = [(name, _getter(name)) for name in type(model).model_fields]
        from rich.table import Table

        table = Table.grid(padding=(0, 2))
        table.add_column(style="bold")
        table.add_column(overflow="fold")
        for name, getter in fields:
            table.add_row(name, _cell(getter(model)))
        self.out.print(table)

    def render(self, renderable: RenderableType) -> None:
        """A rich layout (tree, panel...) on stdout, human mode only; callers print JSON themselves."""
        if not self.json_mode:
            self.out.print(renderable)

    def text(self, line: str) -> None:
        """A plain result line on stdout (human mode only)."""
        if not self.json_mode:
            self.out.print(line, markup=False)

    # messages ----------------------------------------------------------------------------------------------
    def info(self, message: str) -> None:
        if self._err is None:  # plain text needs no rich (what rich would print for it, without the import)
            sys.stderr.write(message + "\n")
            sys.stderr.flush()
            return
        self.err.print(message, markup=False)

    def warn(self, message: str) -> None:
        self.err.print(f"warning: {message}", markup=False, style="yellow")

    @contextmanager
    def spinner(self, description: str) -> Iterator[None]:
        """A spinner on stderr while waiting; only the description line when stderr is not a terminal."""
        if not self.err.is_terminal:
            self.info(description)
            yield
            return
        with self.err.status(description, spinner="dots"):
            yield

    @contextmanager
    def progress(self, description: str, total: int) -> Iterator[Callable[[int], None]]:
        """A byte progress bar on stderr; hidden when stderr is not a terminal. Yields ``advance(nbytes)``."""
        if not self.err.is_terminal:
            yield lambda _n: None
            return
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TransferSpeedColumn,
        )

        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            console=self.err,
            transient=True,
        ) as bar:
            task = bar.add_task(description, total=total)
            yield lambda n: bar.advance(task, n)
