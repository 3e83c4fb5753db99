"""Terminal output of the command: rich for lines, tables and progress bars when installed, plain text otherwise.

Tables are :class:`torchfreeze._core.render.Table` (rich renders them through
``__rich__``; ``str()`` is the one plain-text fallback).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any, TextIO

__all__ = ["Output"]


def _no_progress(n: int = 1, **fields: Any) -> None:
    """``advance`` of a progress bar that is not drawn."""


def _columns() -> int:
    """Width when output is not a terminal: ``COLUMNS`` if set to a number (>= 40), else 120."""
    value = os.environ.get("COLUMNS", "")
    return max(40, int(value)) if value.isdigit() else 120


class Output:
    """Printing through rich when installed (tables, progress), plain text otherwise.

    Args:
        progress: draw progress bars (rich, else tqdm, else a "done" line).
        stream: where to print (default ``sys.stdout``).
        soft_wrap: with rich, do not wrap long lines at the console width.

    >>> import io
    >>> out = Output(progress=False, stream=io.StringIO())
    >>> out.line("hello")
    >>> "hello" in out.stream.getvalue()
    True
    """

    def __init__(self, *, progress: bool, stream: TextIO | None = None, soft_wrap: bool = False) -> None:
        self.stream: TextIO = stream if stream is not None else sys.stdout
        self.progress_enabled = progress
        self.soft_wrap = soft_wrap
        self.console: Any
        try:
            from rich.console import Console

            width = None if self.stream.isatty() else _columns()
            self.console = Console(file=self.stream, width=width, highlight=False)
        except ImportError:
            self.console = None

    def line(self, text: str = "") -> None:
        """One line of text (never read as rich markup)."""
        if self.console is not None:
            self.console.print(text, markup=False, soft_wrap=self.soft_wrap)
        else:
            print(text, file=self.stream, flush=True)

    def heading(self, text: str) -> None:
        """A section heading (a rule with rich)."""
        if self.console is not None:
            self.console.rule(text)
        else:
            print(f"\n== {text} ==", file=self.stream, flush=True)

    def render(self, obj: Any) -> None:
        """A table or report: rich renders it (``__rich__``), else its ``str()``."""
        if self.console is not None:
            self.console.print(obj)
        else:
            print(str(obj), file=self.stream, flush=True)

    @contextlib.contextmanager
    def bar(self, total: int, description: str) -> Iterator[Callable[..., None]]:
        """A progress bar; yields ``advance(n=1, **fields)``."""
        if not self.progress_enabled:
            yield _no_progress
            return
        if self.console is not None:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            with Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(),
                console=self.console,
                transient=False,
            ) as progress:
                task = progress.add_task(description, total=total, info="")

                def advance(n: int = 1, **fields: Any) -> None:
                    info = "  ".join(f"{k} {v}" for k, v in fields.items())
                    progress.update(task, advance=n, info=info)

                yield advance
            return
        try:
            from tqdm import tqdm
        except ImportError:
            yield _no_progress
            self.line(f"{description}: done")
            return
        with tqdm(total=total, desc=description, file=self.stream) as bar:

            def advance_tqdm(n: int = 1, **fields: Any) -> None:
                bar.update(n)
                if fields:
                    bar.set_postfix(fields)

            yield advance_tqdm
