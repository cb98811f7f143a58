"""How a stage fails: one line that says what was found and what to do, and a non-zero exit."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

from rich.console import Console
from rich.markup import escape

console = Console(stderr=True, highlight=False, soft_wrap=True)  # one error, one line: never wrapped

EXIT_STAGE_ERROR = 2


class StageError(Exception):
    """A failure the user can fix. Its message is the whole story, printed without a traceback."""


def run_stage(name: str, body: Callable[[], int | None]) -> int:
    """Run a stage body, print start/end lines with the duration, turn StageError into exit 2."""
    start = time.monotonic()
    console.print(f"[bold]▶ {name}[/bold] started")
    try:
        rc = body() or 0
    except StageError as exc:
        console.print(f"[bold red]✗ {name}[/bold red]: {escape(str(exc))}")
        return EXIT_STAGE_ERROR
    except KeyboardInterrupt:
        console.print(f"[bold red]✗ {name}[/bold red]: interrupted")
        return 130
    took = time.monotonic() - start
    mark = "[bold green]✓" if rc == 0 else "[bold red]✗"
    console.print(f"{mark} {name}[/] finished in {took:.1f} s")
    return rc


def fail(message: str) -> None:
    """For scripts outside a stage body: print one line and exit non-zero."""
    console.print(f"[bold red]error[/bold red]: {escape(message)}")
    sys.exit(EXIT_STAGE_ERROR)
