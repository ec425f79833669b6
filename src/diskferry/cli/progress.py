"""A progress bar on standard error, in the summary's binary units.

One line per phase ("download", then "verifying" when --verify runs),
redrawn at most ten times a second, so that a fast copy does not spend
its time drawing. Sizes and rates are printed by ``units``, the same
functions as the summary: the bar and the summary never disagree on a
unit (a bar in decimal GB/s beside a summary in GiB/s reads as two
different speeds).
"""

import shutil
import sys
import threading
import time
from typing import TextIO

from diskferry.cli import units

#: Seconds between two redraws.
REDRAW_INTERVAL = 0.1


class ProgressBar:
    """The bar of one phase; ``start(total)`` shows it, ``update(n)``
    advances it (from any thread), ``close()`` draws it complete."""

    def __init__(self, phase: str, stream: TextIO = sys.stderr) -> None:
        self._phase = phase
        self._stream = stream
        self._lock = threading.Lock()
        self._total: int | None = None
        self._done = 0
        self._started = 0.0
        self._drawn = 0.0

    def start(self, total: int) -> None:
        with self._lock:
            self._total = total
            self._started = time.monotonic()
            self._draw(force=True)

    def update(self, n: int) -> None:
        with self._lock:
            self._done += n
            self._draw()

    def close(self) -> None:
        with self._lock:
            if self._total is None:
                return
            self._draw(force=True)
            self._stream.write("\n")
            self._stream.flush()
            self._total = None

    def _draw(self, force: bool = False) -> None:
        if self._total is None:
            return
        now = time.monotonic()
        if not force and now - self._drawn < REDRAW_INTERVAL:
            return
        self._drawn = now
        self._stream.write("\r" + self.line(now) + "\x1b[K")
        self._stream.flush()

    def line(self, now: float) -> str:
        """The bar as drawn at time ``now``."""
        total = self._total or 0
        done = min(self._done, total)
        elapsed = now - self._started
        speed = done / elapsed if elapsed > 0 else 0.0
        fraction = done / total if total else 1.0
        if speed > 0 and done < total:
            eta = _clock((total - done) / speed)
        else:
            eta = "--:--" if done < total else _clock(elapsed)
        text = (f"{units.human(done)}/{units.human(total)} "
                f"{units.rate(speed)} {eta}")
        head = f"{self._phase} {fraction * 100:3.0f}% "
        width = shutil.get_terminal_size((80, 24)).columns - 1
        room = width - len(head) - len(text) - 3
        if room < 10:
            return (head + text)[:width]
        filled = int(room * fraction)
        return f"{head}|{'#' * filled}{' ' * (room - filled)}| {text}"


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02}:{secs:02}" if hours else f"{minutes:02}:{secs:02}"
