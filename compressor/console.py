"""Human-facing progress on stderr (rich), silent with --quiet; stdout stays for results/--json."""
from __future__ import annotations

import contextlib
import logging
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

log = logging.getLogger("compressor")


class StageConsole:
    """Stage messages and progress bars. Everything is also logged (the run's log file)."""

    def __init__(self, *, quiet: bool = False, console: Console | None = None):
        self.quiet = quiet
        self.console = console or Console(stderr=True, highlight=False)

    def info(self, message: str) -> None:
        log.info(message)
        if not self.quiet:
            self.console.print(message)

    def warn(self, message: str) -> None:
        log.warning(message)
        if not self.quiet:
            self.console.print(f"[yellow]warning:[/yellow] {message}")

    @contextlib.contextmanager
    def stage(self, description: str, total: int | None = None) -> Iterator[Callable[..., None]]:
        """A progress bar (or spinner when total is None). Yields advance(n=1, note='')."""
        log.info("stage: %s", description)
        if self.quiet:
            yield lambda n=1, note="": None
            return
        columns = [SpinnerColumn(), TextColumn("{task.description}")]
        if total is not None:
            columns += [BarColumn(), MofNCompleteColumn()]
        columns += [TimeElapsedColumn(), TextColumn("{task.fields[note]}")]
        with Progress(*columns, console=self.console, transient=False) as progress:
            task = progress.add_task(description, total=total, note="")

            def advance(n: int = 1, note: str = "") -> None:
                progress.update(task, advance=n, note=note)

            yield advance
            if total is not None:
                progress.update(task, completed=total)
