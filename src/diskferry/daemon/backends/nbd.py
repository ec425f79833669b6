"""The NBD backend: an image served by an NBD server (qemu-nbd, nbdkit).

vdsm exports every qcow2 volume and every backup through qemu-nbd and
installs tickets whose URL names the export (``nbd:unix:/run/vdsm/nbd/
UUID.sock``); this backend is how such a ticket is served. Each client
connection gets its own NBD connection, opened on first use and kept
while the HTTP connection lives.

- On a plain socket (UNIX, TCP) data is spliced: an NBD READ reply's
  payload goes from the NBD socket into a pipe and from the pipe to the
  client, an HTTP body from the client into a pipe and from the pipe into
  an NBD WRITE, and never enters the process. With TLS it goes through
  one buffer: the body is received into the buffer NBD WRITE is sent
  from, and NBD READ lands in the buffer the body is sent from.
- ``max_readers``/``max_writers`` follow ``NBD_FLAG_CAN_MULTI_CONN``: 8
  when the server says connections see each other's writes and flushes,
  else 1 (qemu-nbd offers it only with ``--shared`` above 1).
- Zero-context extents: ``zero`` from ``base:allocation``, ``hole`` only
  from ``qemu:allocation-depth`` 0 (unallocated in the whole chain); an
  export without allocation depth reports no holes. Dirty-context
  extents come from the export's ``qemu:dirty-bitmap:`` context, for
  tickets with ``"dirty": true``.
- Flush: ``NBD_CMD_FLUSH``, which covers every connection of a
  multi-conn export. A server that offers no flush says its writes need
  none (the NBD spec's meaning of a missing ``SEND_FLUSH``); that is
  logged once per connection.
"""

import contextlib
import logging
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Literal

from diskferry import nbd
from diskferry.daemon.backends.base import (
    ALL_FEATURES,
    Backend,
    BackendKind,
    Extent,
    SplicesPipes,
)
from diskferry.daemon.metrics.events import BACKEND_EVENTS
from diskferry.errors import BackendError, NotAvailable, StorageLost
from diskferry.pipe import Pipe

if TYPE_CHECKING:
    from diskferry.daemon.config import Config
    from diskferry.daemon.tickets import Ticket

log = logging.getLogger("diskferry.daemon.backends.nbd")

#: Connections per image when the export allows several (capped by the
#: daemon's ``max_connections``).
MULTI_CONN_CONNECTIONS = 8

#: Seconds to connect to the NBD server and finish the handshake.
CONNECT_TIMEOUT = 10.0


def check_url(url: urllib.parse.SplitResult) -> None:
    text = url.geturl()
    if url.scheme == "nbd+unix" and not url.netloc:
        # geturl() drops an empty authority (nbd+unix:///e -> nbd+unix:/e).
        text = text.replace(":", "://", 1)
    address = nbd.parse_url(text).address
    # The daemon's working directory is nobody's business: a socket is
    # named by an absolute path (or an abstract address).
    if isinstance(address, str) and not address.startswith(("/", "\0")):
        raise ValueError(f"{text!r}: the socket path is not absolute")


def open_nbd(ticket: "Ticket", config: "Config") -> "NbdBackend":
    """The ticket's export, with the ``[backend_nbd]`` configuration."""
    return NbdBackend(ticket.spec.url, dirty=ticket.spec.dirty,
                      buffer_size=config.backend_nbd.buffer_size)


class NbdBackend:
    """One NBD connection to a ticket's export."""

    features = ALL_FEATURES
    remote = False

    def __init__(self, url: str, *, dirty: bool = False,
                 buffer_size: int = 8 * 1024**2) -> None:
        self.url = url
        self.buffer_size = buffer_size
        #: Why there are no dirty extents, when there are none.
        self._no_dirty = "the ticket is not dirty"
        if dirty:
            try:
                self._client = _connect(url, nbd.ANY_BITMAP)
            except nbd.DirtyBitmapError as e:
                # Served as ovirt-imageio does: zero extents, and a 404
                # for the dirty ones.
                self._no_dirty = str(e)
                self._client = _connect(url, None)
        else:
            self._client = _connect(url, None)
        #: An export served read-only refuses writes whatever the ticket.
        self.writable = not self._client.read_only
        connections = (MULTI_CONN_CONNECTIONS if self._client.can_multi_conn
                       else 1)
        self.max_readers = self.max_writers = connections
        self._flush_logged = False

    def size(self) -> int:
        return self._client.size

    def readinto(self, buf: memoryview, offset: int) -> int:
        count = max(0, min(len(buf), self._client.size - offset))
        if count:
            with _storage_errors(self.url):
                self._client.readinto(buf[:count], offset)
        return count

    def write(self, data: memoryview, offset: int) -> int:
        with _storage_errors(self.url):
            self._client.write(data, offset)
        return len(data)

    def zero(self, offset: int, length: int, punch_hole: bool) -> None:
        if length:
            with _storage_errors(self.url):
                self._client.zero(offset, length, punch_hole=punch_hole)

    def flush(self) -> None:
        if not self._client.can_flush and not self._flush_logged:
            log.info("%s offers no flush: its writes are durable as they "
                     "are acknowledged, or not at all", self.url)
            self._flush_logged = True
        with _storage_errors(self.url):
            self._client.flush()

    def extents(self, start: int, length: int) -> list[Extent]:
        return self._client.extents(start, length)

    def dirty_extents(self, start: int, length: int) -> list[Extent]:
        if self._client.dirty_bitmap is None:
            raise NotAvailable(f"{self.url}: {self._no_dirty}")
        return self._client.dirty_extents(start, length)

    def can_splice(self) -> bool:
        return self._client.can_splice

    def pipe_piece(self, capacity: int) -> int:
        return self._client.pipe_piece(capacity)

    def read_to_pipes(self, pipes: Sequence[Pipe], offset: int, length: int,
                      piece: int, reclaim: Callable[[bool], bool]) -> None:
        ends = [pipe.w for pipe in pipes if pipe.w is not None]
        assert len(ends) == len(pipes)
        with _storage_errors(self.url):
            self._client.readinto_pipes(ends, offset, length, piece, reclaim)

    def write_from_pipe(self, pipe: Pipe, offset: int, length: int) -> None:
        assert pipe.r is not None
        with _storage_errors(self.url):
            self._client.write_from_pipe(pipe.r, offset, length)

    def close(self) -> None:
        self._client.close()
        BACKEND_EVENTS.nbd_disconnected()


def _connect(url: str, dirty_bitmap: "str | Literal[True] | None"
             ) -> nbd.Client:
    try:
        client = nbd.open_client(url, dirty_bitmap=dirty_bitmap,
                                 connect_timeout=CONNECT_TIMEOUT)
    except nbd.DirtyBitmapError:
        raise
    except (nbd.NbdError, OSError) as e:
        BACKEND_EVENTS.nbd_failed()
        raise BackendError(f"Cannot open NBD export {url}: {e}") from e
    BACKEND_EVENTS.nbd_connected()
    return client


KIND = BackendKind(check_url=check_url, open=open_nbd)

if TYPE_CHECKING:
    # mypy checks NbdBackend against each protocol it claims.
    _backend: type[Backend] = NbdBackend
    _splices: type[SplicesPipes] = NbdBackend


@contextlib.contextmanager
def _storage_errors(url: str) -> Iterator[None]:
    """A command the server refused, as the storage error it names (an
    NBD_ENOSPC is the file system's ENOSPC), for the handlers to answer
    as they answer a file's; a server gone mid-request as StorageLost,
    naming the export."""
    try:
        yield
    except nbd.RequestError as e:
        BACKEND_EVENTS.nbd_failed()
        raise OSError(e.errno, str(e)) from e
    except (nbd.ConnectionClosed, nbd.ProtocolError) as e:
        BACKEND_EVENTS.nbd_failed()
        raise StorageLost(f"NBD export {url}: {e}") from e
