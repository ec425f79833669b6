"""A blocking NBD client over a UNIX or TCP socket.

This module only moves bytes: what they mean is decided by the sans-I/O
modules ``handshake.py``, ``transmission.py`` and ``wire.py`` and
``extents.py`` (block status to ``Extent``). Replies of read requests are
received with ``recv_into`` straight into the caller's buffer, at the
offset the protocol layer checked, and write payloads are sent with
``sendmsg`` of memoryviews: bulk data is copied once, by the kernel.

Pipelining: a large ``readinto``/``write``/``zero`` is cut into requests
of ``request_size`` bytes (``write_request_size`` for writes) with up to
``queue_depth`` of them in flight on the one socket; replies are matched
by cookie in whatever order they come. ``submit_read``/``submit_write``/
``wait`` expose the same machinery to callers that overlap NBD with other
I/O, and ``readinto_pipes`` keeps one spliced read in flight per pipe.

Defaults measured on a 2-core VM (Debian 12, qemu-nbd 7.2 --shared=8
--read-only of a fully allocated 1 GiB raw on /dev/shm, reading into a
reused 64 MiB buffer, best of 2-3 runs, tests/nbd/bench_client.py):

    request  depth 1     4     8     16    GiB/s (nbdcopy: 1.6-2.6)
    256 KiB        1.22  2.08  2.01  2.37
    512 KiB        -     2.57  2.73  -
    1 MiB          2.35  2.71  2.63  2.06
    2 MiB          2.41  2.36  2.17  2.06
    4 MiB          1.52  1.81  1.74  1.71
    8 MiB          1.42  1.87  1.78  1.64

Client CPU was 0.16-0.27 s/GiB throughout (nbdcopy 0.24). Requests of
512 KiB-1 MiB with 4-8 in flight are fastest: the data still fits the
CPU caches between the server's copy and ours; larger requests lose that
and more depth only adds contention on two cores.

A client is used by one thread at a time; it has no lock. Open one
client per thread (and more than one per export only when the server
says ``can_multi_conn``).
"""

from __future__ import annotations

import errno
import functools
import os
import select
import socket
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Literal, NamedTuple

from diskferry.extent import Extent, split

from . import extents as _extents
from .errors import (
    ConnectionClosed,
    ConnectionTimeout,
    ContextNotNegotiated,
    NbdError,
    ProtocolError,
    RequestError,
)
from .handshake import ExportInfo, Handshake, HandshakeConfig, HandshakeState
from .transmission import PipeTarget, Request, Transmission
from .url import Address, parse_url
from .wire import (
    ALLOCATION_DEPTH,
    BASE_ALLOCATION,
    DIRTY_BITMAP_PREFIX,
    U32_MAX,
    Cmd,
    CmdFlag,
    TxFlag,
)

if TYPE_CHECKING:
    from typing_extensions import Buffer

#: Bytes per read/write request: 1 MiB measured fastest with 512 KiB (see
#: the module docstring); Python's cost per request is already negligible
#: at this size and bigger requests fall out of the CPU caches.
DEFAULT_REQUEST_SIZE = 1024 * 1024

#: Requests in flight per client: 4 measured best at 1 MiB (module docstring).
DEFAULT_QUEUE_DEPTH = 4

#: Bytes per WRITE request. Writing a qcow2 through qemu-nbd costs qemu-nbd
#: less in larger requests: a 4 GiB sparse raw (1 GiB of data) uploaded
#: through the daemon into a new qcow2 took qemu-nbd 0.56-0.65 CPU-s with
#: 8 MiB writes against 0.82-0.91 with 1 MiB, and the daemon 0.23-0.31
#: against 0.33-0.38 (2-core VM; 16 and 32 MiB were no better).
DEFAULT_WRITE_REQUEST_SIZE = 8 * 1024 * 1024

#: Seconds to connect and complete the handshake.
DEFAULT_CONNECT_TIMEOUT = 10.0

#: Seconds without progress on a request before the connection is given up.
DEFAULT_TIMEOUT = 60.0

#: Largest WRITE_ZEROES/TRIM per request in compact mode: 2 GiB fits the
#: 32-bit length and is aligned to any block size; qemu accepts it.
COMPACT_EFFECT_MAX = 1 << 31

#: Same with extended headers (64-bit lengths).
EXTENDED_EFFECT_MAX = 1 << 40

#: Largest BLOCK_STATUS span asked in one call: bounds the reply a server
#: builds (and the descriptors we hold) while keeping huge sparse images
#: to few round trips.
COMPACT_STATUS_MAX = 1 << 31
EXTENDED_STATUS_MAX = 1 << 40

Handle = Request

#: Pass as ``dirty_bitmap`` to select the only bitmap of the export.
ANY_BITMAP: Literal[True] = True

_WRITES = frozenset((Cmd.WRITE, Cmd.WRITE_ZEROES, Cmd.TRIM))


#: Milliseconds ``readinto_pipes`` waits for a reply before it looks
#: again whether a pipe was drained.
RECLAIM_POLL_MS = 5

#: Zeros written per call into a pipe for a hole.
ZEROS_SIZE = 1024 * 1024

@functools.lru_cache(maxsize=4)
def _zeros(size: int) -> memoryview:
    return memoryview(bytes(size))


class _Command(NamedTuple):
    """One request of a pipelined run (``Client._submit``'s arguments)."""

    command: int
    offset: int
    length: int
    flags: int = 0
    buffer: memoryview | None = None
    payload: memoryview | None = None
    pipe: int | None = None


class Client:
    """A connection to one export. See the module docstring.

    ``address``: a UNIX socket path or (host, port). ``dirty_bitmap``: a
    bitmap name, ``ANY_BITMAP`` (the only one offered), or None.
    ``extended_headers``: try 64-bit headers, falling back silently.
    """

    def __init__(
        self,
        address: Address,
        export_name: str = "",
        *,
        dirty_bitmap: str | Literal[True] | None = None,
        allocation_depth: bool = True,
        extended_headers: bool = False,
        request_size: int = DEFAULT_REQUEST_SIZE,
        write_request_size: int = DEFAULT_WRITE_REQUEST_SIZE,
        queue_depth: int = DEFAULT_QUEUE_DEPTH,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        if request_size < 1 or write_request_size < 1 or queue_depth < 1:
            raise ValueError("request sizes and queue_depth must be positive")
        self.address = address
        self.export_name = export_name
        self._timeout = timeout
        self._broken: NbdError | None = None
        self._shutdown = False
        self._closed = False
        #: While ``readinto_pipes`` runs: its requests not yet complete, in
        #: the order the reader drains their pipes.
        self._pipe_order: deque[Request] | None = None
        #: A read of that run failed: the reader may never drain the pipes
        #: of the pieces after it, so replies still coming are dropped.
        self._pipe_failed = False
        self._scratch: memoryview | None = None
        self._sock = _connect(address, connect_timeout)
        try:
            info = self._handshake(
                HandshakeConfig(
                    export_name=export_name,
                    extended_headers=extended_headers,
                    allocation_depth=allocation_depth,
                    dirty_bitmap=dirty_bitmap,
                )
            )
        except BaseException:
            self._sock.close()
            self._closed = True
            raise
        self._sock.settimeout(timeout)
        self.info = info
        self._tx = Transmission(info)
        self._poll = select.poll()
        self._poll.register(self._sock, select.POLLIN | select.POLLOUT)
        self._poll_in = select.poll()
        self._poll_in.register(self._sock, select.POLLIN)
        align = info.min_block
        self.max_payload = min(info.max_payload, U32_MAX) // align * align
        self.request_size = self._payload_size(request_size)
        self.write_request_size = self._payload_size(write_request_size)
        self.queue_depth = queue_depth
        if info.extended_headers:
            self._effect_max = EXTENDED_EFFECT_MAX
            self._status_max = EXTENDED_STATUS_MAX
        else:
            self._effect_max = COMPACT_EFFECT_MAX
            self._status_max = COMPACT_STATUS_MAX

    def _payload_size(self, size: int) -> int:
        """``size`` within the server's payload limit, aligned to its block."""
        align = self.info.min_block
        return max(align, min(size, self.max_payload) // align * align)

    # --- properties-----------------------------------------------------------

    @property
    def size(self) -> int:
        return self.info.size

    def _flag(self, flag: TxFlag) -> bool:
        return bool(self.info.flags & flag)

    @property
    def read_only(self) -> bool:
        return self._flag(TxFlag.READ_ONLY)

    @property
    def can_flush(self) -> bool:
        """False when the server has no FLUSH: ``flush()`` is then a no-op
        and a caller that promises durability must say it cannot."""
        return self._flag(TxFlag.SEND_FLUSH)

    @property
    def can_fua(self) -> bool:
        return self._flag(TxFlag.SEND_FUA)

    @property
    def can_trim(self) -> bool:
        return self._flag(TxFlag.SEND_TRIM)

    @property
    def can_zero(self) -> bool:
        return self._flag(TxFlag.SEND_WRITE_ZEROES)

    @property
    def can_fast_zero(self) -> bool:
        return self._flag(TxFlag.SEND_FAST_ZERO)

    @property
    def can_multi_conn(self) -> bool:
        return self._flag(TxFlag.CAN_MULTI_CONN)

    @property
    def can_splice(self) -> bool:
        """Whether reads can be spliced into a pipe: the data of a reply
        must come in order, which NBD_CMD_FLAG_DF asks of a server that
        sends structured replies (simple replies always do)."""
        return (not self.info.structured_replies or
                self._flag(TxFlag.SEND_DF))

    @property
    def block_size(self) -> tuple[int, int, int]:
        """(minimum, preferred, maximum payload) as honoured by the client."""
        return (self.info.min_block, self.info.preferred_block, self.info.max_payload)

    @property
    def has_allocation_depth(self) -> bool:
        return ALLOCATION_DEPTH in self.info.contexts

    @property
    def has_base_allocation(self) -> bool:
        return BASE_ALLOCATION in self.info.contexts

    @property
    def dirty_bitmap(self) -> str | None:
        for name in self.info.contexts:
            if name.startswith(DIRTY_BITMAP_PREFIX):
                return name[len(DIRTY_BITMAP_PREFIX) :]
        return None

    @property
    def extended_headers(self) -> bool:
        return self.info.extended_headers

    # --- data-----------------------------------------------------------------

    def readinto(self, buf: Buffer, offset: int) -> None:
        """Fill ``buf`` with the export's bytes at ``offset``; holes read as
        zeros. Raises RequestError if any part failed: never partial data."""
        view = memoryview(buf).cast("B")
        self._check_range(offset, len(view))
        step = self.request_size
        self._pipeline(
            _Command(Cmd.READ, offset + pos, min(step, len(view) - pos),
                     buffer=view[pos : pos + step])
            for pos in range(0, len(view), step)
        )

    def write(self, data: Buffer, offset: int, fua: bool = False) -> None:
        """Write ``data`` at ``offset``; with ``fua`` it is durable on return."""
        view = memoryview(data).cast("B")
        self._check_writable()
        self._check_range(offset, len(view))
        flags, flush_after = self._fua(fua)
        step = self.write_request_size
        self._pipeline(
            _Command(Cmd.WRITE, offset + pos, min(step, len(view) - pos), flags,
                     payload=view[pos : pos + step])
            for pos in range(0, len(view), step)
        )
        if flush_after:
            self.flush()

    def zero(
        self, offset: int, length: int, *, punch_hole: bool, fast: bool = False
    ) -> None:
        """Make a range read as zeros.

        ``punch_hole`` lets the server deallocate (else NO_HOLE keeps it
        allocated). ``fast`` asks the server to fail with ENOTSUP unless
        zeroing is faster than writing zeros; then the caller writes only
        what is not already zero. Without WRITE_ZEROES the zeros are
        written from a shared zero buffer.
        """
        self._check_writable()
        self._check_range(offset, length)
        if fast and not (self.can_zero and self.can_fast_zero):
            raise RequestError(errno.ENOTSUP, "server cannot zero fast")
        if not self.can_zero:
            zeros = _zeros(self.request_size)
            self._pipeline(
                _Command(Cmd.WRITE, pos, n, payload=zeros[:n])
                for pos, n in split(offset, offset + length, self.request_size)
            )
            return
        flags = 0 if punch_hole else CmdFlag.NO_HOLE
        if fast:
            flags |= CmdFlag.FAST_ZERO
        self._pipeline(
            _Command(Cmd.WRITE_ZEROES, pos, n, flags)
            for pos, n in split(offset, offset + length, self._effect_max)
        )

    def trim(self, offset: int, length: int) -> None:
        """Tell the server a range is unused; a no-op if it cannot trim
        (trim is advisory: the content becomes undefined either way)."""
        self._check_writable()
        self._check_range(offset, length)
        if not self.can_trim:
            return
        self._pipeline(
            _Command(Cmd.TRIM, pos, n)
            for pos, n in split(offset, offset + length, self._effect_max)
        )

    def flush(self) -> None:
        """Make every completed write durable. Waits first for the replies
        of all writes in flight, so the flush covers them. A no-op when the
        server has no FLUSH (see ``can_flush``)."""
        self._check_usable()
        if not self.can_flush:
            return
        self._drain(lambda req: req.command in _WRITES)
        self.wait(self._submit(Cmd.FLUSH, 0, 0))

    def extents(self, offset: int = 0, length: int | None = None) -> list[Extent]:
        """Zero-context extents of a range, merged and clipped to it.

        ``zero`` from base:allocation, ``hole`` only from
        qemu:allocation-depth 0 (always False without it). Without
        base:allocation the range is one data extent.
        """
        length = self.size - offset if length is None else length
        self._check_range(offset, length)
        if not self.has_base_allocation:
            return [Extent(offset, length, False)] if length else []
        base = self.info.contexts[BASE_ALLOCATION]
        depth = self.info.contexts.get(ALLOCATION_DEPTH)
        result: list[Extent] = []

        def decode(pos: int, end: int, req: Request) -> int:
            depth_descs = None if depth is None else req.statuses[depth]
            return _extents.zero_extents(
                pos, end, req.statuses[base], depth_descs, result
            )

        self._walk_status(offset, offset + length, decode)
        return result

    def dirty_extents(self, offset: int = 0, length: int | None = None) -> list[Extent]:
        """Dirty-context extents: ``dirty`` from the bitmap, ``zero`` from
        base:allocation. Raises ContextNotNegotiated without a bitmap."""
        bitmap = self.dirty_bitmap
        if bitmap is None:
            raise ContextNotNegotiated("no dirty bitmap was selected for this export")
        length = self.size - offset if length is None else length
        self._check_range(offset, length)
        bitmap_id = self.info.contexts[DIRTY_BITMAP_PREFIX + bitmap]
        base = self.info.contexts.get(BASE_ALLOCATION)
        result: list[Extent] = []

        def decode(pos: int, end: int, req: Request) -> int:
            base_descs = None if base is None else req.statuses[base]
            return _extents.dirty_extents(
                pos, end, req.statuses[bitmap_id], base_descs, result
            )

        self._walk_status(offset, offset + length, decode)
        return result

    # --- splicing: data between the socket and a pipe, in the kernel---------

    def readinto_pipes(self, pipes: Sequence[int], offset: int, length: int,
                       piece: int, reclaim: Callable[[bool], bool]) -> None:
        """Splice ``length`` bytes at ``offset`` into ``pipes`` in turn,
        ``piece`` bytes each (piece i into ``pipes[i % len(pipes)]``), with
        one read in flight per pipe: the server reads several at once.

        Another thread drains the pipes in the same turn and, after each
        piece, lets one ``reclaim(block)`` call return True; a pipe takes
        its next piece only after that (``reclaim(False)`` asks without
        waiting, ``reclaim(True)`` waits and may raise to stop this).

        Replies come in any order. One whose predecessors are all complete
        is spliced: it may wait for room in its pipe, but the reader drains
        in order and needs nothing from the socket first. One that overtook
        another is received through a buffer and written into its pipe,
        which is empty and holds a whole piece (``piece`` is at most the
        pipes' capacity), so no wait here hangs on a reply still behind it
        in the socket. Raises RequestError for a failed read, after the
        reads sent have ended; the pipes may then hold part of the data.
        """
        self._check_spliced_read(offset, length, piece)
        flags = CmdFlag.DF if self.info.structured_replies else 0
        order = self._pipe_order = deque()
        self._pipe_failed = False
        error: RequestError | None = None
        try:
            pieces = split(offset, offset + length, piece)
            for i, (pos, count) in enumerate(pieces):
                # pipes[i % n] held piece i - n.
                if i >= len(pipes):
                    error = self._await_drained(order, reclaim)
                if error is not None:
                    break
                order.append(self._submit(Cmd.READ, pos, count, flags,
                                          pipe=pipes[i % len(pipes)]))
            while order:
                failed = self._complete_in_order(order)
                error = error or failed
        except BaseException:
            if order:
                # Replies still to come name pipes that are going away.
                self._fail(ConnectionClosed("a spliced read was abandoned "
                                            "with replies in flight"))
            raise
        finally:
            self._pipe_order = None
            self._pipe_failed = False
        if error is not None:
            raise error

    def pipe_piece(self, capacity: int) -> int:
        """The largest piece ``readinto_pipes`` takes for pipes of
        ``capacity`` bytes: aligned to the block size, at most a request."""
        align = self.info.min_block
        return max(align, min(capacity, self.max_payload) // align * align)

    def _check_spliced_read(self, offset: int, length: int,
                            piece: int) -> None:
        self._check_range(offset, length)
        if not self.can_splice:
            raise ValueError("the server cannot send unfragmented reads")
        if piece != self.pipe_piece(piece):
            raise ValueError(f"pieces of {piece} bytes do not fit the export")

    def _await_drained(self, order: deque[Request],
                       reclaim: Callable[[bool], bool]) -> RequestError | None:
        """Wait until ``reclaim`` says a pipe was drained, completing the
        replies that come meanwhile (a server may hold one back until it
        sees the next request); returns the first of them that failed."""
        error = None
        while not reclaim(False):
            if not order:
                reclaim(True)
                break
            if self._reply_waiting(RECLAIM_POLL_MS):
                failed = self._complete_in_order(order)
                error = error or failed
        return error

    def _reply_waiting(self, timeout_ms: int) -> bool:
        """Whether reply bytes arrive within ``timeout_ms``."""
        return bool(self._poll_in.poll(timeout_ms))

    def _complete_in_order(self, order: deque[Request]) -> RequestError | None:
        """Read one reply; drop the requests complete at the front of
        ``order``; return the reply's error."""
        req = self._read_reply()
        while order and order[0].done:
            order.popleft()
        if req.error is not None:
            self._pipe_failed = True
        return req.error

    def write_from_pipe(self, pipe: int, offset: int, length: int) -> None:
        """Write ``length`` bytes read from ``pipe`` at ``offset``, spliced
        into the socket as another thread fills the pipe; pipelined like
        ``write``. A pipe that ends early breaks the connection: a WRITE
        whose payload was cut cannot be taken back."""
        self._check_writable()
        self._check_range(offset, length)
        self._pipeline(
            _Command(Cmd.WRITE, pos, count, pipe=pipe)
            for pos, count in split(offset, offset + length,
                                          self.write_request_size)
        )

    # --- lower level: overlap with other I/O----------------------------------

    def submit_read(self, buf: Buffer, offset: int) -> Handle:
        """Send one read of ``len(buf)`` (at most ``max_payload``) bytes."""
        view = memoryview(buf).cast("B")
        self._check_range(offset, len(view))
        if len(view) > self.max_payload:
            raise ValueError(f"read of {len(view)} bytes exceeds {self.max_payload}")
        return self._submit(Cmd.READ, offset, len(view), buffer=view)

    def submit_write(self, data: Buffer, offset: int) -> Handle:
        """Send one write of at most ``max_payload`` bytes."""
        view = memoryview(data).cast("B")
        self._check_writable()
        self._check_range(offset, len(view))
        if len(view) > self.max_payload:
            raise ValueError(f"write of {len(view)} bytes exceeds {self.max_payload}")
        return self._submit(Cmd.WRITE, offset, len(view), payload=view)

    def wait(self, handle: Handle) -> None:
        """Process replies until ``handle``'s arrives; raise its error."""
        while not handle.done:
            self._check_usable()
            self._read_reply()
        if handle.error is not None:
            raise handle.error

    # --- lifecycle------------------------------------------------------------

    def close(self) -> None:
        """Wait for replies in flight, send NBD_CMD_DISC and close."""
        if self._closed:
            return
        try:
            if self._broken is None:
                self._drain(lambda req: True)
                _, header = self._tx.request(Cmd.DISC, 0, 0)
                self._send(header, None)
                self._sock.shutdown(socket.SHUT_WR)
        except NbdError:
            pass
        except OSError:
            pass
        finally:
            self._closed = True
            self._broken = self._broken or ConnectionClosed("client is closed")
            self._sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- internals------------------------------------------------------------

    def _handshake(self, config: HandshakeConfig) -> ExportInfo:
        hs = Handshake(config)
        self._send(hs.data_to_send(), None)
        while hs.state is not HandshakeState.DONE:
            hs.receive_data(self._recv_exact(hs.bytes_needed()))
            out = hs.data_to_send()
            if out:
                self._send(out, None)
        assert hs.info is not None
        return hs.info

    def _check_usable(self) -> None:
        if self._broken is not None:
            raise type(self._broken)("connection is unusable") from self._broken
        if self._shutdown:
            raise ConnectionClosed("server is shutting down")

    def _check_writable(self) -> None:
        self._check_usable()
        if self.read_only:
            raise RequestError(errno.EPERM, "export is read-only")

    def _check_range(self, offset: int, length: int) -> None:
        self._check_usable()
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(
                f"range [{offset}, {offset + length}) outside export of {self.size}"
            )
        align = self.info.min_block
        if offset % align or length % align:
            raise ValueError(f"range not aligned to the minimum block size {align}")

    def _fua(self, fua: bool) -> tuple[int, bool]:
        if not fua:
            return 0, False
        if self.can_fua:
            return CmdFlag.FUA, False
        return 0, True

    def _submit(self, command: int, offset: int, length: int, flags: int = 0,
                buffer: memoryview | None = None,
                payload: memoryview | None = None,
                pipe: int | None = None) -> Request:
        """Send a command; a READ with ``pipe`` is spliced into it, a WRITE
        with ``pipe`` takes its payload from it."""
        self._check_usable()
        if command == Cmd.WRITE and pipe is not None:
            req, header = self._tx.request(command, offset, length, flags)
            self._send(header, None)
            self._splice_out(pipe, length)
            return req
        req, header = self._tx.request(command, offset, length, flags, buffer,
                                       pipe)
        self._send(header, payload)
        return req

    def _pipeline(self, requests: Iterator[_Command]) -> None:
        """Run requests with up to ``queue_depth`` in flight; stop sending
        after the first failure, wait for what was sent, raise it."""
        pending: deque[Request] = deque()
        error: RequestError | None = None
        for cmd in requests:
            if len(pending) >= self.queue_depth:
                failed = self._settle(pending.popleft())
                error = error or failed
            if error is not None:
                break
            req = self._submit(*cmd)
            pending.append(req)
        while pending:
            failed = self._settle(pending.popleft())
            error = error or failed
        if error is not None:
            raise error

    def _settle(self, req: Request) -> RequestError | None:
        while not req.done:
            self._read_reply()
        self._note_error(req.error)
        return req.error

    def _note_error(self, error: RequestError | None) -> None:
        if error is not None and error.errno == errno.ESHUTDOWN:
            # The server is going away: soft disconnect, accept nothing new.
            self._shutdown = True

    def _drain(self, which: Callable[[Request], bool]) -> None:
        while any(which(req) for req in self._tx.in_flight.values()):
            self._read_reply()

    def _block_status(self, offset: int, length: int) -> Request:
        length = min(length, self._status_max)
        req = self._submit(Cmd.BLOCK_STATUS, offset, length)
        self.wait(req)
        return req

    def _walk_status(self, offset: int, end: int,
                     decode: Callable[[int, int, Request], int]) -> None:
        """Block status of ``[offset, end)``, in order, with up to
        ``queue_depth`` windows of the largest status length in flight:
        a huge sparse export costs round trips / depth, not round trips.

        ``decode(pos, window_end, reply)`` appends a reply's extents from
        ``pos`` and returns where they stopped; a window its reply did not
        cover to the end is finished with requests of its own before the
        next window's reply is decoded.
        """
        step = self._status_max
        windows = deque[tuple[int, int, Request]]()
        next_start = offset
        while windows or next_start < end:
            while next_start < end and len(windows) < self.queue_depth:
                length = min(step, end - next_start)
                windows.append((next_start, next_start + length,
                                self._submit(Cmd.BLOCK_STATUS, next_start,
                                             length)))
                next_start += length
            start, window_end, req = windows.popleft()
            self.wait(req)
            pos = decode(start, window_end, req)
            while pos < window_end:
                pos = decode(pos, window_end,
                             self._block_status(pos, window_end - pos))

    # --- socket I/O-----------------------------------------------------------

    def _fail(self, error: NbdError) -> NbdError:
        if self._broken is None:
            self._broken = error
        return error

    def _read_reply(self) -> Request:
        """Read until one reply completes; the only place replies are read."""
        tx = self._tx
        try:
            while True:
                need = tx.need()
                if isinstance(need, int):
                    req = tx.received(self._recv_exact(need))
                elif isinstance(need, PipeTarget):
                    order = self._pipe_order
                    if self._pipe_failed:
                        self._copy_in(need, deliver=False)
                    elif order and order[0].pipe != need.fd and not need.zeros:
                        self._copy_in(need)
                    else:
                        self._splice_in(need)
                    req = tx.received(None)
                else:
                    self._recv_into(need)
                    req = tx.received(None)
                if req is not None:
                    self._note_error(req.error)
                    return req
        except ProtocolError as e:
            raise self._fail(e) from None

    def _recv_exact(self, n: int) -> bytes:
        buf = bytearray(n)
        self._recv_into(memoryview(buf))
        return bytes(buf)

    def _recv_into(self, view: memoryview) -> None:
        sock = self._sock
        pos = 0
        size = len(view)
        try:
            while pos < size:
                got = sock.recv_into(view[pos:])
                if not got:
                    raise self._fail(ConnectionClosed("server closed the connection"))
                pos += got
        except TimeoutError as e:
            raise self._fail(ConnectionTimeout("server did not answer in time")) from e
        except OSError as e:
            raise self._fail(ConnectionClosed(f"connection failed: {e}")) from e

    def _send(self, header: bytes, payload: memoryview | None) -> None:
        """Send header and payload without joining them. While the socket
        is full, read replies that are waiting: a server blocked on sending
        us replies may stop reading, and both sides would wait forever."""
        parts: list[memoryview] = [memoryview(header)]
        if payload is not None and len(payload):
            parts.append(payload)
        sock = self._sock
        try:
            while parts:
                sent = sock.sendmsg(parts)
                while parts and sent >= len(parts[0]):
                    sent -= len(parts[0])
                    parts.pop(0)
                if parts:
                    parts[0] = parts[0][sent:]
                    self._wait_writable()
        except TimeoutError as e:
            raise self._fail(ConnectionTimeout("server did not read in time")) from e
        except OSError as e:
            raise self._fail(ConnectionClosed(f"connection failed: {e}")) from e

    def _splice_in(self, target: PipeTarget) -> None:
        """Move a reply's data from the socket into a pipe (or zeros, for
        a hole). The socket is non-blocking under its timeout: wait for
        data, then splice what is there."""
        left = target.count
        try:
            if target.zeros:
                while left:
                    left -= os.write(target.fd, _zeros(ZEROS_SIZE)[:left])
                return
            sockfd = self._sock.fileno()
            while left:
                try:
                    n = os.splice(sockfd, target.fd, left)
                except BlockingIOError:
                    self._wait(select.POLLIN)
                    continue
                if n == 0:
                    raise self._fail(ConnectionClosed("server closed the connection"))
                left -= n
        except TimeoutError as e:
            raise self._fail(ConnectionTimeout("server did not answer in time")) from e
        except OSError as e:
            raise self._fail(ConnectionClosed(f"connection failed: {e}")) from e

    def _copy_in(self, target: PipeTarget, deliver: bool = True) -> None:
        """Move a reply's data into a pipe through a buffer: the pipe is
        empty and takes it whole, so the write does not wait. Without
        ``deliver``, read the data and drop it."""
        if target.zeros:
            return  # only dropped ones come here
        if self._scratch is None or len(self._scratch) < target.count:
            self._scratch = memoryview(bytearray(target.count))
        view = self._scratch[:target.count]
        self._recv_into(view)
        if not deliver:
            return
        try:
            while view:
                view = view[os.write(target.fd, view):]
        except OSError as e:
            # The reply was read but not delivered: the request is lost.
            raise self._fail(ConnectionClosed(
                f"the pipe's reader went away: {e}")) from e

    def _splice_out(self, pipe: int, count: int) -> None:
        """Move a WRITE's payload from a pipe into the socket."""
        sockfd = self._sock.fileno()
        try:
            while count:
                try:
                    n = os.splice(pipe, sockfd, count)
                except BlockingIOError:
                    self._wait_writable()
                    continue
                if n == 0:
                    # The WRITE's header promised more: the stream is lost.
                    raise self._fail(ConnectionClosed(
                        f"the pipe ended {count} bytes before the payload"))
                count -= n
        except TimeoutError as e:
            raise self._fail(ConnectionTimeout("server did not read in time")) from e
        except OSError as e:
            raise self._fail(ConnectionClosed(f"connection failed: {e}")) from e

    def _wait(self, events: int) -> None:
        poller = select.poll()
        poller.register(self._sock, events)
        if not poller.poll(int(self._timeout * 1000)):
            raise TimeoutError

    def _wait_writable(self) -> None:
        if not hasattr(self, "_tx"):
            return  # handshake: nothing to read meanwhile
        timeout_ms = int(self._timeout * 1000)
        while True:
            events = self._poll.poll(timeout_ms)
            if not events:
                raise TimeoutError
            mask = events[0][1]
            if mask & select.POLLOUT:
                return
            if mask & (select.POLLIN | select.POLLHUP | select.POLLERR):
                if not self._tx.in_flight:
                    return  # let sendmsg report the failure
                self._read_reply()


def _connect(address: Address, timeout: float) -> socket.socket:
    try:
        if isinstance(address, str):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                sock.connect(address)
            except BaseException:
                sock.close()
                raise
        else:
            sock = socket.create_connection(address, timeout=timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except TimeoutError as e:
        raise ConnectionTimeout(f"cannot connect to {address!r}: timed out") from e
    except OSError as e:
        raise ConnectionClosed(f"cannot connect to {address!r}: {e}") from e
    return sock


def open_client(url: str, **options: object) -> Client:
    """Connect to the export an NBD URL names (see ``url.parse_url``)."""
    parsed = parse_url(url)
    return Client(parsed.address, parsed.export_name, **options)  # type: ignore[arg-type]
