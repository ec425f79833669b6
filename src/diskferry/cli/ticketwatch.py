"""``ticket list --watch``: the tickets table, polled at an interval.

Each poll adds a RATE column: how fast each ticket's ``transferred``
grew since the poll before (the daemon keeps counts, not rates). On a
terminal the table is redrawn in place, as ``watch`` and ``top`` do,
cut to the window so that a wide table does not wrap and scroll. Into a
pipe or a file it is written once per interval under a timestamp, as
``vmstat`` and ``iostat`` do, so that a night's transfers can be logged
with ``ticket list --watch 60 >> file``; no escape codes go there.

Ctrl-C ends the watch: the last table stays, and the status is 130, as
for any command interrupted, so that a script running it stops too.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Sequence
from typing import Protocol, TextIO

from diskferry.cli import tickettable, units
from diskferry.cli.common import ReaderGone
from diskferry.cli.ticketrates import Sample, rates
from diskferry.cli.tickettable import TicketInfo

#: Seconds between polls when ``--watch`` is given no number.
DEFAULT_INTERVAL = 2.0

#: The shortest interval: polling faster only loads the daemon.
MIN_INTERVAL = 0.1

#: Terminal controls: cursor to the top left, clear the rest of the
#: line, clear the rest of the screen, clear the whole screen.
HOME = "\x1b[H"
CLEAR_LINE = "\x1b[K"
CLEAR_BELOW = "\x1b[J"
CLEAR_SCREEN = "\x1b[2J"

#: The tickets, as the control service lists them.
Poll = Callable[[], Sequence[TicketInfo]]


class Display(Protocol):
    """Where each poll's table goes."""

    def show(self, text: str) -> None:
        """Show the table of one poll."""

    def close(self) -> None:
        """The watch ends (Ctrl-C, or the daemon cannot be reached)."""


class TerminalDisplay:
    """Redraws the table in place, under a title and the time."""

    def __init__(self, out: TextIO, title: str) -> None:
        self.out = out
        self.title = title
        out.write(HOME + CLEAR_SCREEN)

    def show(self, text: str) -> None:
        columns, lines = shutil.get_terminal_size()
        heading = f"{self.title}  {time.strftime('%H:%M:%S')}"
        # One line fewer than the window: a newline on its last line
        # would scroll the title away.
        shown = [heading, "", *text.splitlines()][:max(1, lines - 1)]
        self.out.write(HOME + "".join(line[:columns] + CLEAR_LINE + "\n"
                                      for line in shown) + CLEAR_BELOW)
        self.out.flush()

    def close(self) -> None:
        """The shell's prompt goes below the table, not over it."""
        self.out.write("\n")
        self.out.flush()


class LogDisplay:
    """Appends each table under the date and time of its poll."""

    def __init__(self, out: TextIO) -> None:
        self.out = out

    def show(self, text: str) -> None:
        """ReaderGone when the reader went away (``| head``)."""
        try:
            self.out.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n"
                           f"{text}\n\n")
            self.out.flush()
        except BrokenPipeError as e:
            raise ReaderGone from e

    def close(self) -> None:
        pass


def display_for(out: TextIO, interval: float) -> Display:
    """Redrawn on a terminal, logged anywhere else."""
    if out.isatty():
        return TerminalDisplay(
            out, f"Every {interval:g}s: diskferry ticket list")
    return LogDisplay(out)


def frame(infos: Sequence[TicketInfo], ticket_rates: dict[str, float],
          full_ids: bool) -> str:
    """One poll's table, with each ticket's rate in its RATE column."""
    if not infos:
        return "no tickets"
    rows = [{**info, "rate": _rate(ticket_rates.get(str(info["uuid"])))}
            for info in infos]
    return tickettable.table(rows, full_ids=full_ids,
                             columns=tickettable.WATCH_COLUMNS)


def _rate(value: float | None) -> str | None:
    """A RATE cell: None (shown "-") for a ticket without a rate."""
    return None if value is None else units.rate(value)


def watch(poll: Poll, display: Display, interval: float,
          full_ids: bool = False) -> None:
    """Poll and show until interrupted; polls keep to the interval
    however long each takes, unless one takes longer."""
    previous: Sample | None = None
    next_poll = time.monotonic()
    try:
        while True:
            infos = poll()
            sample = Sample.of(infos, time.monotonic())
            display.show(frame(infos, rates(previous, sample), full_ids))
            previous = sample
            next_poll = max(next_poll + interval, time.monotonic())
            time.sleep(max(0.0, next_poll - time.monotonic()))
    finally:
        display.close()
