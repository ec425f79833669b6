"""The backend interface: what a handler needs from an image's storage.

A backend module (``file``, ``nbd``, ``http``, ``memory``) provides a
``BackendKind``: how to check a ticket URL of its schemes when the
ticket is installed, and how to open the image for one connection. The
registry in ``diskferry.daemon.backends`` maps URL schemes to kinds; nothing
else in the daemon knows which backends exist.

``Backend`` is what every backend has. What only some have is a
capability protocol of its own, claimed by having its members::

    ZeroCopyFile       file      a descriptor for sendfile and splice
    SplicesPipes       nbd       reads and writes spliced through pipes
    ForwardsChecksum   http      checksums computed by the storage

Each backend module lets mypy check its class against every protocol it
claims. Backends raise ``BackendError`` and its subclasses, never an
HTTP status.
"""

from collections.abc import Callable, Sequence
from typing import (
    TYPE_CHECKING,
    NamedTuple,
    Protocol,
    TypeGuard,
    runtime_checkable,
)
from urllib.parse import SplitResult

from diskferry.extent import Extent
from diskferry.pipe import Pipe

if TYPE_CHECKING:
    from diskferry.daemon.config import Config
    from diskferry.daemon.tickets import Ticket

__all__ = ["ALL_FEATURES", "Backend", "BackendKind", "Extent",
           "ForwardsChecksum", "SplicesPipes", "ZeroCopyFile",
           "offers_splicing", "offers_zero_copy_file"]

#: The images-API features (OPTIONS ``features``) storage on this host
#: can serve; a ticket's rights decide which of them OPTIONS advertises.
ALL_FEATURES = frozenset({"checksum", "extents", "flush", "zero"})


class Backend(Protocol):
    """One image, open for one connection.

    Buffers come first and offsets second in every data method, as in
    ``os.preadv`` and the client library.
    """

    #: Connections that may read, or write, this image at once (OPTIONS
    #: ``max_readers``/``max_writers``, capped by the daemon's
    #: ``max_connections``).
    max_readers: int
    max_writers: int

    #: Bytes a handler moves per backend call when data goes through a
    #: buffer (TLS, or a backend without a descriptor).
    buffer_size: int

    #: Features of ``ALL_FEATURES`` the storage can serve. Local storage
    #: serves all; a proxied image only what the server behind it offers,
    #: so that OPTIONS never advertises what would fail.
    features: frozenset[str]

    #: False when the storage refuses writes whatever the ticket says (an
    #: export served read-only, an upstream whose ticket allows reading
    #: only): OPTIONS then offers no PUT or PATCH.
    writable: bool

    #: True when writes cross a network (a proxied image): a PUT's next
    #: buffer is then received while the last one is sent, even under
    #: TLS, where local storage is written in turn.
    remote: bool

    def size(self) -> int:
        """Size of the image in bytes."""

    def readinto(self, buf: memoryview, offset: int) -> int:
        """Read at ``offset`` into ``buf``; returns bytes read (short at EOF)."""

    def write(self, data: memoryview, offset: int) -> int:
        """Write all of ``data`` at ``offset``; returns ``len(data)``."""

    def zero(self, offset: int, length: int, punch_hole: bool) -> None:
        """Make the range read as zeros, deallocating it if ``punch_hole``."""

    def flush(self) -> None:
        """Make every completed write of every connection durable."""

    def extents(self, start: int, length: int) -> list[Extent]:
        """Zero-context extents covering ``[start, start+length)``, merged."""

    def dirty_extents(self, start: int, length: int) -> list[Extent]:
        """Dirty-context extents of the range (``dirty`` and ``zero`` set).

        Raises ``NotAvailable`` when the storage keeps no dirty bitmap.
        """

    def close(self) -> None:
        """Release the backend's resources."""


# Capabilities: what some backends offer beyond ``Backend``. A backend
# claims one by having its members (methods only, so that a class can be
# checked), and one without has no stubs. The data path asks per request
# with ``offers_zero_copy_file``/``offers_splicing``.


@runtime_checkable
class ZeroCopyFile(Protocol):
    """A backend whose storage is a file the kernel can copy to and from
    by itself (``sendfile`` for GET, ``splice`` for PUT)."""

    def fileno(self) -> int | None:
        """The file's descriptor, or None when the kernel must not copy
        it through the page cache (``O_DIRECT``)."""


@runtime_checkable
class SplicesPipes(Protocol):
    """A backend behind a socket whose data the kernel can splice into
    and out of pipes (an NBD export): a request's bytes then never enter
    the process."""

    def can_splice(self) -> bool:
        """Whether this connection to the storage can splice now (a
        server must send each read's data in order, in one piece)."""

    def pipe_piece(self, capacity: int) -> int:
        """Bytes ``read_to_pipes`` puts in a pipe of ``capacity`` at a time."""

    def read_to_pipes(self, pipes: Sequence[Pipe], offset: int, length: int,
                      piece: int, reclaim: Callable[[bool], bool]) -> None:
        """Splice ``length`` bytes at ``offset`` into ``pipes`` in turn,
        ``piece`` bytes each, several read at once, while another thread
        drains them in the same turn. A pipe takes its next piece once
        ``reclaim(block)`` says its last one was drained."""

    def write_from_pipe(self, pipe: Pipe, offset: int, length: int) -> None:
        """Write ``length`` bytes at ``offset`` spliced from ``pipe``, while
        another thread fills it."""


@runtime_checkable
class ForwardsChecksum(Protocol):
    """A backend whose storage computes checksums itself (an images-API
    server behind a proxy): asked for one, instead of the handler reading
    the whole image through the backend to hash it."""

    def checksum(self, algorithm: str, block_size: int) -> dict[str, object]:
        """The storage's checksum answer: ``checksum``, ``algorithm``,
        ``block_size``."""


def offers_zero_copy_file(backend: object) -> TypeGuard[ZeroCopyFile]:
    """``isinstance(backend, ZeroCopyFile)``, answered once per class.

    ``isinstance`` on a protocol walks its members at every call in
    Python 3.11: 9-15 us here, where the daemon spends about 190 us of
    CPU on a whole 4 KiB GET. ``issubclass`` keeps its answer per class
    (0.25 us).
    """
    return issubclass(type(backend), ZeroCopyFile)


def offers_splicing(backend: object) -> TypeGuard[SplicesPipes]:
    """``isinstance(backend, SplicesPipes)``, answered once per class."""
    return issubclass(type(backend), SplicesPipes)


class BackendKind(NamedTuple):
    """A backend as the registry knows it."""

    #: Raises ``ValueError`` with a message for a URL this backend cannot
    #: serve; called when a ticket is installed, so it must not block.
    check_url: Callable[[SplitResult], None]
    #: Opens the ticket's image for one connection; raises ``BackendError``.
    open: "Callable[[Ticket, Config], Backend]"
