"""Progress of the long steps (dataset download, merge, convert, quantize, perplexity), readable
wherever the output goes.

On a terminal these are rich's bars and spinners. Elsewhere (a stage under ``invoke pipeline``,
whose output is piped into the console and logs/<stage>.log, ``docker logs``, CI) a bar redrawn
with carriage returns turns into one unreadable line, and rich draws nothing at all until the end.
There they become plain lines: one when a step starts, one every PLAIN_INTERVAL seconds or 10 %,
and one when it ends.

    with Progress(*columns, console=console) as progress:    # drop-in for rich.progress.Progress
        task = progress.add_task("merging 291 tensors", total=n)
        progress.update(task, advance=1)

    with status("fetching dataset org/name"):                  # unknown length: a heartbeat
        ...
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import rich
import rich.progress

from stages.common.errors import console

PLAIN_INTERVAL = float(os.environ.get("KILN_PROGRESS_INTERVAL", "15"))  # seconds between plain lines
PLAIN_STEP = 0.10  # and at every 10 % done


def is_terminal() -> bool:
    return console.is_terminal


def _amount(n: float, total: float | None) -> str:
    scale = total or n
    if scale >= 1e8:  # bytes, as the merge counts them
        return f"{n / 1e9:.2f}" if scale >= 1e9 else f"{n / 1e6:.0f}"
    return f"{n:.0f}"


def _unit(total: float | None) -> str:
    return "" if not total or total < 1e8 else (" GB" if total >= 1e9 else " MB")


class Progress(rich.progress.Progress):
    """rich's Progress; plain lines instead of a redrawn bar when the console is not a terminal."""

    def __init__(self, *columns, interval: float | None = None, **kwargs):
        plain = not (kwargs.get("console") or rich.get_console()).is_terminal
        if plain:
            kwargs["transient"] = True  # the plain lines say it all; no final drawing of the bar
        super().__init__(*columns, **kwargs)
        self.plain = plain
        self.interval = PLAIN_INTERVAL if interval is None else interval
        self._said: dict[rich.progress.TaskID, tuple[float, float]] = {}  # task -> (time, fraction) last said

    def _say(self, task_id: rich.progress.TaskID, final: bool = False) -> None:
        task = self._tasks.get(task_id)
        if task is None:
            return
        now = time.monotonic()
        frac = task.completed / task.total if task.total else 0.0
        last_t, last_f = self._said.get(task_id, (None, -1.0))
        due = last_t is None or now - last_t >= self.interval or frac - last_f >= PLAIN_STEP
        if not (final or due) or (final and last_f >= 1.0):
            return
        self._said[task_id] = (now, frac)
        done = f"{_amount(task.completed, task.total)}"
        of = f"/{_amount(task.total, task.total)}{_unit(task.total)} ({frac:.0%})" if task.total else ""
        self.console.print(f"{task.description}: {done}{of}, {task.elapsed or 0:.0f} s", markup=False, highlight=False)

    def update(self, task_id, *args, **kwargs) -> None:
        super().update(task_id, *args, **kwargs)
        if self.plain:
            self._say(task_id)

    def advance(self, task_id, advance: float = 1) -> None:
        super().advance(task_id, advance)
        if self.plain:
            self._say(task_id)

    def stop(self) -> None:
        if self.plain:
            for task_id in list(self._tasks):
                self._say(task_id, final=True)
        super().stop()


@contextmanager
def status(what: str, interval: float | None = None) -> Iterator[None]:
    """A spinner on a terminal; elsewhere, `heartbeat` lines."""
    if is_terminal():
        with console.status(what):
            yield
    else:
        with heartbeat(what, interval):
            yield


@contextmanager
def heartbeat(what: str, interval: float | None = None, detail: Callable[[], str] | None = None) -> Iterator[None]:
    """Off a terminal: a line when the step starts, one every `interval` seconds while it runs (with
    `detail()`, e.g. "12 chunks scored", when given), and one with its duration at the end. On a
    terminal nothing: the caller's spinner or bar speaks."""
    if is_terminal():
        yield
        return
    every = PLAIN_INTERVAL if interval is None else interval
    t0 = time.monotonic()
    console.print(f"{what} ...", markup=False, highlight=False)
    done = threading.Event()

    def beat() -> None:
        while not done.wait(every):
            more = detail() if detail else ""
            line = f"{what}: {more + ', ' if more else ''}still running, {time.monotonic() - t0:.0f} s"
            console.print(line, markup=False, highlight=False)

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
    console.print(f"{what}: done in {time.monotonic() - t0:.1f} s", markup=False, highlight=False)


@contextmanager
def hub_progress_bars() -> Iterator[None]:
    """huggingface_hub's download bars on a terminal only; `status` speaks for them elsewhere."""
    if is_terminal():
        yield
        return
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            enable_progress_bars()


def plain_env() -> dict[str, str]:
    """Environment for a child process whose tqdm bars are piped through plain lines: a redraw at
    most every PLAIN_INTERVAL seconds (tqdm reads TQDM_* defaults from the environment)."""
    return {} if is_terminal() else {"TQDM_MININTERVAL": str(PLAIN_INTERVAL)}
