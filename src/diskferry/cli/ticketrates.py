"""How fast each ticket's transfer moves, from two polls of the tickets.

The daemon counts a ticket's ``transferred`` bytes (tickets with one op;
a range moved twice counts once) but keeps no rate: a rate is the
difference between two readings over the time between them, which only
a caller polling at an interval has. Pure functions, so that the
arithmetic is tested apart from sockets and terminals.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from diskferry.cli.tickettable import TicketInfo


@dataclass(frozen=True)
class Sample:
    """Every ticket's ``transferred``, read at one instant."""

    #: When the answer arrived, in seconds of ``time.monotonic()``.
    taken_at: float
    #: Bytes transferred, by ticket id; tickets without the field (read
    #: and write both allowed) are left out.
    transferred: Mapping[str, int]

    @classmethod
    def of(cls, infos: Iterable[TicketInfo], taken_at: float) -> Sample:
        transferred = {str(info["uuid"]): value for info in infos
                       if isinstance(value := info.get("transferred"), int)}
        return cls(taken_at, transferred)


def rate(before: int | None, after: int | None,
         seconds: float) -> float | None:
    """Bytes per second from ``before`` to ``after``, ``seconds`` apart.

    None when there is no rate to tell: a reading is missing (the first
    poll, a ticket just added) or the count went down (the ticket was
    deleted and another added under its id).
    """
    if before is None or after is None or seconds <= 0 or after < before:
        return None
    return (after - before) / seconds


def rates(before: Sample | None, after: Sample) -> dict[str, float]:
    """The rate of every ticket that has one between the two samples."""
    if before is None:
        return {}
    seconds = after.taken_at - before.taken_at
    found = {ticket_id: rate(before.transferred.get(ticket_id), value,
                             seconds)
             for ticket_id, value in after.transferred.items()}
    return {ticket_id: value for ticket_id, value in found.items()
            if value is not None}
