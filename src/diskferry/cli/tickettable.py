"""Tickets as a person reads them: ``ticket list`` and ``ticket show``.

The control service answers the protocol's JSON, which ``--json``
prints unchanged for scripts. Its ``expires`` is in the daemon's
monotonic clock; the command runs on the daemon's host (the control
socket is a UNIX socket), where ``time.monotonic()`` reads the same
clock, so the time left is exact and is shown as a local wall-clock time
and as "in 5m". An id is a bearer secret: it is shortened as the
daemon's log shortens it, unless ``--full-ids`` asks for it whole; so
is the upstream's ticket id at the end of a proxy ticket's URL.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence

from diskferry.cli import units

#: A ticket's info, as ``GET /tickets/ID`` answers it.
TicketInfo = Mapping[str, object]

#: Columns of ``ticket list``, as (heading, field name).
COLUMNS = (("ID", "uuid"), ("URL", "url"), ("OPS", "ops"),
           ("SIZE", "size"), ("TRANSFERRED", "transferred"),
           ("CONNECTIONS", "connections"), ("IDLE", "idle_time"),
           ("EXPIRES", "expires"))

#: Columns of ``ticket list --watch``: RATE, after TRANSFERRED, is the
#: ``rate`` the watch adds to each info from two polls, as text.
WATCH_COLUMNS = COLUMNS[:5] + (("RATE", "rate"),) + COLUMNS[5:]

#: More fields ``ticket show`` prints, after the columns.
DETAILS = (("TRANSFER ID", "transfer_id"), ("TIMEOUT", "timeout"),
           ("INACTIVITY TIMEOUT", "inactivity_timeout"),
           ("SPARSE", "sparse"), ("DIRTY", "dirty"),
           ("ACTIVE", "active"), ("CANCELED", "canceled"),
           ("FILENAME", "filename"), ("FORMAT", "format"),
           ("BACKING CHAIN", "backing_chain"), ("BITMAP", "bitmap"),
           ("EXPORT", "export"))

#: Fields ``ticket show`` prints only when the ticket has them.
OPTIONAL = frozenset({"filename", "format", "backing_chain", "bitmap",
                      "export"})

#: Schemes of a proxy ticket's URL, which ends in the upstream's ticket id.
UPSTREAM_SCHEMES = ("https://", "http://")

#: Characters of an id the log shows at most; no more than a quarter of
#: the id, never enough to use it.
ID_PREFIX = 4


def short_id(ticket_id: str) -> str:
    """``ticket_id`` as the daemon's log shows it: ``6f1c...``."""
    return ticket_id[:min(ID_PREFIX, len(ticket_id) // 4)] + "..."


def duration(seconds: float) -> str:
    """``seconds`` as "45s", "5m", "2h 5m" or "3d 4h"."""
    whole = max(0, round(seconds))
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h" if hours else f"{days}d"
    if hours:
        return f"{hours}h {minutes}m" if minutes else f"{hours}h"
    return f"{minutes}m" if minutes else f"{secs}s"


def expiry(expires: float, now_monotonic: float, now_wall: float) -> str:
    """A ticket's ``expires`` as "21:14:03 (in 5m)", or "expired"."""
    left = expires - now_monotonic
    if left <= 0:
        return "expired"
    wall = now_wall + left
    same_day = time.localtime(wall)[:3] == time.localtime(now_wall)[:3]
    clock = time.strftime("%H:%M:%S" if same_day else "%Y-%m-%d %H:%M:%S",
                          time.localtime(wall))
    return f"{clock} (in {duration(left)})"


class Formatter:
    """Turns info fields into the text of a cell, at one instant."""

    def __init__(self, full_ids: bool) -> None:
        self.full_ids = full_ids
        self.now_monotonic = time.monotonic()
        self.now_wall = time.time()
        self._by_field: dict[str, Callable[[object], str]] = {
            "uuid": self._ticket_id, "url": self._url, "ops": _ops, "size": _size,
            "transferred": _size, "idle_time": _idle,
            "expires": self._expires, "export": _export}

    def cell(self, info: TicketInfo, field: str) -> str:
        value = info.get(field)
        if value is None:
            return "-"
        return self._by_field.get(field, _plain)(value)

    def _ticket_id(self, value: object) -> str:
        return str(value) if self.full_ids else short_id(str(value))

    def _url(self, value: object) -> str:
        """A proxy ticket's URL names the upstream's ticket: a secret."""
        url = str(value)
        base, sep, upstream_id = url.rpartition("/images/")
        if self.full_ids or not sep or not url.startswith(UPSTREAM_SCHEMES):
            return url
        return base + sep + short_id(upstream_id)

    def _expires(self, value: object) -> str:
        if not isinstance(value, int | float):
            return str(value)
        return expiry(value, self.now_monotonic, self.now_wall)


def _plain(value: object) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def _export(value: object) -> str:
    """What serves a format ticket: "qemu-nbd 1234 on nbd:unix:/...". """
    if not isinstance(value, dict):
        return str(value)
    pid = value.get("pid")
    state = f"{value.get('kind')} {pid}" if pid else \
        f"{value.get('kind')} (stopped)"
    return f"{state} on {value.get('url')}"


def _ops(value: object) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def _size(value: object) -> str:
    return units.human(value) if isinstance(value, int) else str(value)


def _idle(value: object) -> str:
    return duration(value) if isinstance(value, int | float) else str(value)


def table(infos: Sequence[TicketInfo], full_ids: bool = False,
          columns: Sequence[tuple[str, str]] = COLUMNS) -> str:
    """Every ticket as a row under a heading, columns aligned."""
    formatter = Formatter(full_ids)
    rows = [[heading for heading, _ in columns]]
    rows += [[formatter.cell(info, field) for _, field in columns]
             for info in infos]
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths,
                                                            strict=True))
        .rstrip() for row in rows)


def details(info: TicketInfo, full_ids: bool = False) -> str:
    """One ticket, a field a line: the columns of ``table`` and more."""
    formatter = Formatter(full_ids)
    fields = COLUMNS + DETAILS
    width = max(len(heading) for heading, _ in fields) + 1
    return "\n".join(f"{heading.lower() + ':':<{width}} "
                     f"{formatter.cell(info, field)}"
                     for heading, field in fields
                     if field not in OPTIONAL or field in info)
