"""The backend of a ticket whose export the daemon runs (``daemon.exports``).

The image is read and written through the NBD backend unchanged, on the
export's socket; this backend adds one thing: a request that fails
because the export died is answered with how it died (a 500 naming
qemu-nbd's exit), and the next connection starts it again. Only a
failure pays for the look: the data path is the NBD backend's.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, ParamSpec, TypeVar

from diskferry import nbd
from diskferry.daemon.backends.base import Backend, Extent, SplicesPipes
from diskferry.daemon.backends.nbd import NbdBackend
from diskferry.errors import BackendError, ExportFailed
from diskferry.pipe import Pipe

if TYPE_CHECKING:
    from diskferry.daemon.config import Config
    from diskferry.daemon.tickets import Ticket, TicketExport

#: What a request on a dead export fails with (``BackendError``: the
#: connection to it failed).
_FAILURES = (nbd.NbdError, OSError, BackendError)

#: What a request fails with when the export's connection was lost, not
#: answered with an error.
_LOST = (nbd.ConnectionClosed, OSError, BackendError)

#: Seconds a request that lost its export waits for the export's end, to
#: name it: a killed qemu-nbd closes its sockets before its last thread
#: ends.
DYING_TIMEOUT = 1.0


def open_managed(ticket: Ticket, config: Config) -> ManagedBackend:
    """The ticket's export, started again if it is not running."""
    export = ticket.export
    assert export is not None
    return ManagedBackend(export, dirty=ticket.spec.dirty,
                          buffer_size=config.backend_nbd.buffer_size)


_P = ParamSpec("_P")
_R = TypeVar("_R")


class ManagedBackend(NbdBackend):
    """One NBD connection to an export the daemon runs."""

    def __init__(self, export: TicketExport, *, dirty: bool,
                 buffer_size: int) -> None:
        self._export = export
        self._named(super().__init__, export.url(), dirty=dirty,
                    buffer_size=buffer_size)

    def _named(self, call: Callable[_P, _R], *args: _P.args,
               **kwargs: _P.kwargs) -> _R:
        """``call(...)``, failing with how the export died when it did."""
        try:
            return call(*args, **kwargs)
        except _FAILURES as e:
            self._raise_if_dead(e)
            raise

    def _raise_if_dead(self, error: Exception | None) -> None:
        """Raise how the export died, when it did (``error`` may be its
        consequence)."""
        cause = self._export.failure()
        if cause is None and isinstance(error, _LOST):
            cause = self._failure_within(DYING_TIMEOUT)
        if cause is not None:
            raise ExportFailed(
                f"The export of this image stopped ({cause}); it starts "
                f"again on the next connection") from error

    def _failure_within(self, timeout: float) -> str | None:
        deadline = time.monotonic() + timeout
        cause = None
        while cause is None and time.monotonic() < deadline:
            time.sleep(0.01)
            cause = self._export.failure()
        return cause

    def size(self) -> int:
        # Asked before a GET's head is sent: the last moment a death can
        # still be answered as a failure.
        self._raise_if_dead(None)
        return super().size()

    # The NBD backend's, a dead export's failure named.

    def readinto(self, buf: memoryview, offset: int) -> int:
        return self._named(super().readinto, buf, offset)

    def write(self, data: memoryview, offset: int) -> int:
        return self._named(super().write, data, offset)

    def zero(self, offset: int, length: int, punch_hole: bool) -> None:
        self._named(super().zero, offset, length, punch_hole)

    def flush(self) -> None:
        self._named(super().flush)

    def extents(self, start: int, length: int) -> list[Extent]:
        return self._named(super().extents, start, length)

    def dirty_extents(self, start: int, length: int) -> list[Extent]:
        return self._named(super().dirty_extents, start, length)

    def read_to_pipes(self, pipes: Sequence[Pipe], offset: int, length: int,
                      piece: int, reclaim: Callable[[bool], bool]) -> None:
        self._named(super().read_to_pipes, pipes, offset, length, piece,
                    reclaim)

    def write_from_pipe(self, pipe: Pipe, offset: int, length: int) -> None:
        self._named(super().write_from_pipe, pipe, offset, length)

if TYPE_CHECKING:
    _backend: type[Backend] = ManagedBackend
    _splices: type[SplicesPipes] = ManagedBackend
