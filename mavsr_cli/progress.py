"""Rich progress bars for long loops, quiet when output is not a terminal or MAVSR_QUIET is set."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import TypeVar

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

T = TypeVar("T")


def enabled() -> bool:
    return sys.stderr.isatty() and not os.environ.get("MAVSR_QUIET")


def bar() -> Progress:
    from rich.console import Console

    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
        console=Console(stderr=True), disable=not enabled(), transient=False,
    )


def progress(items: Iterable[T], description: str, total: int | None = None) -> Iterable[T]:
    items = list(items) if total is None else items
    n = len(items) if total is None else total
    with bar() as p:
        task = p.add_task(description, total=n, info="")
        for x in items:
            yield x
            p.advance(task)
