"""Log lines a peer cannot forge.

Logged values come from peers: ticket ids and paths from URLs, header
values, ticket fields (``transfer_id``, ``url``). A value holding a line
break would start a line of its own that a reader or a log parser takes
for a record of the daemon. The formatter escapes every control character
of a record's message, after ``%`` formatting, so that no call site needs
to remember to; a record is always one line. Tracebacks keep their line
breaks but lose every other control character.
"""

import logging
import os
import sys
from types import TracebackType

ExcInfo = (tuple[type[BaseException], BaseException, TracebackType | None]
           | tuple[None, None, None])

#: Code points escaped: C0 controls (line feed, carriage return, escape,
#: ...), DEL, C1 controls (NEL), and the Unicode line and paragraph
#: separators that some viewers break lines at.
_ESCAPED = [*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029]

_MESSAGE_TABLE = {c: f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"
                  for c in _ESCAPED}

_TRACEBACK_TABLE = {c: v for c, v in _MESSAGE_TABLE.items() if c != 0x0A}

#: The daemon's log line: time, level, thread (it names the connection).
LOG_FORMAT = ("%(asctime)s %(levelname)-7s (%(threadName)s) %(name)s: "
              "%(message)s")


def escape(text: str) -> str:
    """``text`` with every control character written as an escape."""
    return text.translate(_MESSAGE_TABLE)


class EscapingFormatter(logging.Formatter):
    """A Formatter whose records never span lines (tracebacks apart)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape(record.message)
        return super().formatMessage(record)

    def formatException(self, ei: ExcInfo) -> str:
        return super().formatException(ei).translate(_TRACEBACK_TABLE)

    def formatStack(self, stack_info: str) -> str:
        return super().formatStack(stack_info).translate(_TRACEBACK_TABLE)


class LineWriter(logging.Handler):
    """Writes each record to a descriptor with one ``write(2)``, unlocked.

    A ``StreamHandler`` holds its lock across the write; a thread that
    then waits for the GIL to come back from the system call keeps every
    other thread's log line, and so the request that logs it, waiting
    behind it. Under load (every request logs a line) that queue sets
    the latency of small requests. The kernel keeps one ``write(2)``
    whole on a file and, up to ``PIPE_BUF``, on a pipe; a record longer
    than that (a traceback) may interleave with another on a pipe.
    """

    def __init__(self, fd: int) -> None:
        super().__init__()
        self._fd = fd

    def handle(self, record: logging.LogRecord) -> bool:
        if not self.filter(record):
            return False
        self.emit(record)
        return True

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = (self.format(record) + "\n").encode(errors="replace")
            while data:
                data = data[os.write(self._fd, data):]
        except Exception:
            self.handleError(record)


def configure(level: str) -> None:
    """Log to stderr through the escaping formatter."""
    handler = LineWriter(sys.stderr.fileno())
    handler.setFormatter(EscapingFormatter(LOG_FORMAT))
    # The line names no process: spare every record a getpid() call.
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging.basicConfig(level=level.upper(), handlers=[handler])
