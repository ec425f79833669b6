"""The HTTP backend: the proxy role, an image served by another images-API
server.

A client that cannot reach a host's daemon gets a ticket on a proxy
whose URL is the host's transfer URL (``https://host-17:54322/images/
TICKET``; ``http://`` for a server on a trusted network only, as nothing
protects the data on the way). Every images call is forwarded there:

- OPTIONS is asked once per ticket (``upstream``); this daemon's own
  OPTIONS then advertises the features its ticket allows and the server
  offers, and no more readers or writers than the server takes.
- Data goes through the connection's buffer, a slot (a quarter of
  ``buffer_size``) per upstream request: the body of a PUT is received
  from the client into a slot and sent upstream from it, a GET's answer
  is received into a slot and sent to the client from it; the handler
  moves the next slot on one side while this one moves on the other. One
  copy, MiB-sized, never a whole request in memory.
- Writes go upstream with ``flush=n`` and a flush is one upstream flush,
  which covers the whole image; a server without the flush feature
  flushes each PUT itself. Zero, extents (both contexts, ``start`` and
  ``length`` passed on) and checksum are asked of the server, never
  emulated: the checksum is computed where the image is stored, not by
  reading it through the proxy.
- An upstream error answer is passed back with its status and message.
- A request whose connection broke (the server's idle close, a reset)
  is sent once more on a new connection: every upstream request is whole
  in memory (no body, a JSON body, or one buffer slot) and writes are
  idempotent, so sending one again is the same as sending it once. A
  second failure fails the client's request with a 500, and its
  connection is closed, so a client resends since its last flush.
"""

import logging
import urllib.parse
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from diskferry.client.errors import ClientError, ConnectionFailed, HTTPError
from diskferry.client.extents import parse_extents
from diskferry.client.policy import Timeout
from diskferry.daemon.backends import upstream
from diskferry.daemon.backends.base import (
    ALL_FEATURES,
    Backend,
    BackendKind,
    Extent,
    ForwardsChecksum,
)
from diskferry.daemon.metrics.events import BACKEND_EVENTS
from diskferry.errors import FeatureNotOffered, UpstreamAnswered, UpstreamFailed
from diskferry.extent import merged

if TYPE_CHECKING:
    from diskferry.daemon.config import Config
    from diskferry.daemon.tickets import Ticket

log = logging.getLogger("diskferry.daemon.backends.http")

T = TypeVar("T")


def check_url(url: urllib.parse.SplitResult) -> None:
    if not url.hostname:
        raise ValueError(f"{url.geturl()!r}: no host")
    url.port  # noqa: B018 -- raises ValueError for a bad port
    ticket_id = url.path.removeprefix("/images/")
    if ticket_id == url.path or not ticket_id or "/" in ticket_id:
        raise ValueError(f"{url.geturl()!r}: not a transfer URL "
                         f"(/images/TICKET)")


def open_http(ticket: "Ticket", config: "Config") -> "HttpBackend":
    """The ticket's upstream image, with the ``[backend_http]``
    configuration."""
    section = config.backend_http
    settings = upstream.Settings(
        cafile=section.ca_file or config.tls.ca_file or None,
        timeout=Timeout(section.connect_timeout, section.read_timeout),
        own_socket=config.local_socket if config.local.enable else None)
    pool = upstream.attach(ticket, settings)
    return HttpBackend(ticket, pool, section.buffer_size)


class HttpBackend:
    """One client connection's use of a ticket's upstream pool."""

    remote = True

    def __init__(self, ticket: "Ticket", pool: upstream.UpstreamPool,
                 buffer_size: int) -> None:
        self._ticket = ticket
        self._pool = pool
        self.buffer_size = buffer_size
        self.features = pool.features & ALL_FEATURES
        self.writable = pool.writable
        self.max_readers = pool.max_readers
        self.max_writers = pool.max_writers
        self._closed = False

    def size(self) -> int:
        if self._pool.size is None:
            self._pool.size = self._call("size",
                                         lambda con: con.probe_size())
        return self._pool.size

    def readinto(self, buf: memoryview, offset: int) -> int:
        count = max(0, min(len(buf), self.size() - offset))
        if count:
            self._call("GET", lambda con: con.readinto(buf[:count], offset))
        return count

    def write(self, data: memoryview, offset: int) -> int:
        # A server without the flush feature flushes every PUT anyway.
        flush = "flush" not in self.features
        self._call("PUT", lambda con: con.write(data, offset, flush=flush))
        return len(data)

    def zero(self, offset: int, length: int, punch_hole: bool) -> None:
        # Whether zeroing deallocates is the upstream ticket's to say.
        self._require("zero")
        if length:
            self._call("zero", lambda con: con.zero(offset, length))

    def flush(self) -> None:
        if "flush" in self.features:
            self._call("flush", lambda con: con.flush())

    def extents(self, start: int, length: int) -> list[Extent]:
        return self._extents("zero", start, length)

    def dirty_extents(self, start: int, length: int) -> list[Extent]:
        return self._extents("dirty", start, length)

    def checksum(self, algorithm: str, block_size: int) -> dict[str, object]:
        self._require("checksum")
        answer = self._call(
            "checksum", lambda con: con.checksum(algorithm, block_size))
        if not isinstance(answer, dict) or "checksum" not in answer:
            raise self._failed("checksum", f"no checksum in {answer!r:.80}")
        return answer

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            upstream.detach(self._ticket, self._pool)

    def _extents(self, context: str, start: int, length: int) -> list[Extent]:
        self._require("extents")
        answer = self._call(
            "extents", lambda con: con.extents(context, start, length))
        # ovirt-imageio ignores start and length: the whole image comes.
        first = answer[0] if answer else None
        whole = isinstance(first, dict) and first.get("start") == 0
        try:
            extents = parse_extents(answer, start=0 if whole else start)
        except ClientError as e:
            raise self._failed("extents", e) from e
        return clipped(extents, start, start + length)

    def _require(self, feature: str) -> None:
        if feature not in self.features:
            raise FeatureNotOffered(f"The server behind this proxy does not "
                                    f"offer {feature} for this image")

    def _call(self, what: str, request: Callable[[Any], T]) -> T:
        """Run ``request`` on a pooled connection; once more on a new
        connection if that one broke (see the module docstring)."""
        con = self._pool.acquire()
        BACKEND_EVENTS.upstream_request()
        try:
            try:
                return request(con)
            except ConnectionFailed as e:
                log.info("%s: %s failed (%s); sending it again on a new "
                         "connection", self._pool.server, what, e)
                con.close()
                BACKEND_EVENTS.upstream_request()
                return request(con)
        except HTTPError as e:
            BACKEND_EVENTS.upstream_failed()
            raise UpstreamAnswered(e.status, e.message or
                                   f"{e.status} {e.reason}") from e
        except ClientError as e:
            BACKEND_EVENTS.upstream_failed()
            con.close()
            raise self._failed(what, e) from e
        finally:
            self._pool.release(con)

    def _failed(self, what: str, error: object) -> UpstreamFailed:
        """The error of a failed upstream: its details go to the log only."""
        log.warning("%s: %s failed: %s", self._pool.server, what, error)
        return UpstreamFailed(f"The server behind this proxy failed ({what}); "
                              f"a write is to be sent again since the last "
                              f"flush")


def clipped(extents: list[Extent], start: int, end: int) -> list[Extent]:
    """``extents`` cut to ``[start, end)``."""
    return merged(
        Extent(max(e.start, start), min(e.end, end) - max(e.start, start),
               e.zero, e.hole, e.dirty)
        for e in extents if e.end > start and e.start < end)


KIND = BackendKind(check_url=check_url, open=open_http)

if TYPE_CHECKING:
    # mypy checks HttpBackend against each protocol it claims.
    _backend: type[Backend] = HttpBackend
    _checksum: type[ForwardsChecksum] = HttpBackend
