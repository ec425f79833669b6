"""The NBD transmission phase, without I/O: cookies, request packing, and
reply decoding with strict checks.

Like h11 for HTTP, nothing here touches a socket: ``Transmission`` packs
requests and decodes replies from bytes the caller reads, so every rule
can be checked by table tests without a server, and the socket layer
(``client.py``) stays a thin loop.

Reading replies is driven by ``Transmission.need()``: it answers a byte
count (read exactly that many bytes and pass them to ``received``), a
``memoryview`` (fill it completely, then call ``received(None)``), or a
``PipeTarget`` (splice that many bytes into the pipe, or write zeros for
a hole, then call ``received(None)``). The views are slices of the
caller's own read buffer, checked against the request first, so the
payload of a read reply goes straight from the socket into place with
one copy, and a server can never make the client write outside the
range it asked for.

Strictness: anything that would desynchronise the stream or that the
protocol forbids raises ``ProtocolError`` (the connection must be
dropped); a failed command sets ``Request.error`` and the connection goes
on. Specification: NetworkBlockDevice/nbd doc/proto.md; extended headers
from its extension-ext-header branch.
"""

from __future__ import annotations

import enum
import struct
from bisect import bisect_left
from dataclasses import dataclass, field

from .errors import (
    ProtocolError,
    RequestError,
)
from .handshake import ExportInfo
from .wire import (
    DESC,
    ERROR,
    EXT_DESC,
    EXT_REPLY,
    EXT_REQUEST,
    EXTENDED_REPLY_MAGIC,
    EXTENDED_REQUEST_MAGIC,
    HOLE,
    MAX_DESCRIPTORS,
    MAX_ERROR_PAYLOAD,
    REPLY_FLAG_DONE,
    REPLY_TYPE_ERROR_BIT,
    REQUEST,
    REQUEST_MAGIC,
    SIMPLE_REPLY,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY,
    STRUCTURED_REPLY_MAGIC,
    U32,
    U32_MAX,
    U64,
    U64_MAX,
    Cmd,
    CmdFlag,
    ReplyType,
)

# --- transmission------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PipeTarget:
    """Where a READ's data goes when it is spliced, not copied: ``count``
    bytes from the socket into pipe ``fd``, which takes them in order."""

    fd: int
    count: int
    #: A hole: write ``count`` zeros into the pipe, read nothing.
    zeros: bool = False


@dataclass(eq=False, slots=True)
class Request:
    """One command in flight and what its reply has said so far."""

    cookie: int
    command: int
    offset: int
    length: int
    #: READ: the caller's destination, exactly ``length`` bytes.
    buffer: memoryview | None = None
    #: READ into a pipe instead (sent with NBD_CMD_FLAG_DF): the data must
    #: arrive in order, as one chunk or as chunks that follow each other.
    pipe: int | None = None
    #: READ: sorted, disjoint (start, end) ranges already filled.
    ranges: list[tuple[int, int]] = field(default_factory=list)
    covered: int = 0
    #: BLOCK_STATUS: context id -> [(length, flags), ...]
    statuses: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    error: RequestError | None = None
    done: bool = False


class _R(enum.Enum):
    HEADER = 1
    HEADER_TAIL = 2
    PAYLOAD = 3
    DATA_OFFSET = 4
    DATA = 5
    SIMPLE_DATA = 6


def pack_request(
    command: int,
    flags: int,
    cookie: int,
    offset: int,
    length: int,
    *,
    extended: bool,
) -> bytes:
    """A request header; the WRITE payload follows it on the wire."""
    if extended:
        if command == Cmd.WRITE:
            flags |= CmdFlag.PAYLOAD_LEN
        return EXT_REQUEST.pack(
            EXTENDED_REQUEST_MAGIC, flags, command, cookie, offset, length
        )
    if length > U32_MAX:
        raise ValueError(f"length {length} does not fit a compact request")
    return REQUEST.pack(REQUEST_MAGIC, flags, command, cookie, offset, length)


_ZEROS = bytes(1024 * 1024)


def _zero_fill(view: memoryview) -> None:
    step = len(_ZEROS)
    for pos in range(0, len(view), step):
        n = min(step, len(view) - pos)
        view[pos : pos + n] = _ZEROS[:n]


class Transmission:
    """The transmission phase: cookies, request packing and reply decoding.

    ``request()`` registers a command and returns its header; the caller
    sends it (and a WRITE payload). Replies are decoded by alternating
    ``need()`` and ``received()``; ``received`` returns the ``Request``
    whose reply completed, or None while more is needed.
    """

    def __init__(self, info: ExportInfo) -> None:
        self.info = info
        self.structured = info.structured_replies
        self.extended = info.extended_headers
        self.context_ids = frozenset(info.contexts.values())
        self.in_flight: dict[int, Request] = {}
        self._next_cookie = 1
        self._state = _R.HEADER
        self._need: int | memoryview | PipeTarget = (
            EXT_REPLY.size if self.extended else 16)
        self._head = b""
        self._req: Request | None = None
        self._chunk_flags = 0
        self._chunk_type = 0
        self._chunk_len = 0
        self._data_range = (0, 0)
        self.broken: ProtocolError | None = None

    # -- requests

    def request(
        self,
        command: int,
        offset: int,
        length: int,
        flags: int = 0,
        buffer: memoryview | None = None,
        pipe: int | None = None,
    ) -> tuple[Request, bytes]:
        if self.broken is not None:
            raise ProtocolError("connection is unusable") from self.broken
        if command == Cmd.READ and pipe is None and (
                buffer is None or len(buffer) != length):
            raise ValueError("a read needs a buffer of exactly its length")
        if command == Cmd.BLOCK_STATUS and not self.structured:
            raise ValueError("block status needs structured replies")
        if offset < 0 or length < 0 or offset + length > U64_MAX:
            raise ValueError("offset or length out of range")
        cookie = self._next_cookie
        self._next_cookie = cookie + 1 if cookie < U64_MAX else 1
        header = pack_request(
            command, flags, cookie, offset, length, extended=self.extended
        )
        req = Request(cookie, command, offset, length, buffer, pipe=pipe)
        if command != Cmd.DISC:
            self.in_flight[cookie] = req
        return req, header

    # -- replies

    def need(self) -> int | memoryview | PipeTarget:
        """What to read next: a byte count, a view to fill completely, or
        bytes to splice into a pipe."""
        return self._need

    def received(self, data: bytes | None) -> Request | None:
        """Consume what ``need()`` asked for; return a completed request."""
        try:
            return self._received(data)
        except ProtocolError as e:
            self.broken = e
            raise

    def _received(self, data: bytes | None) -> Request | None:
        if self.broken is not None:
            raise ProtocolError("connection is unusable") from self.broken
        state = self._state
        if state is _R.HEADER:
            assert data is not None
            if self.extended:
                return self._on_ext_header(data)
            (magic,) = U32.unpack_from(data)
            if magic == SIMPLE_REPLY_MAGIC:
                return self._on_simple(data)
            if magic != STRUCTURED_REPLY_MAGIC:
                raise ProtocolError(f"bad reply magic {magic:#x}")
            if not self.structured:
                raise ProtocolError("structured reply was not negotiated")
            self._head = data
            self._expect(_R.HEADER_TAIL, 4)
            return None
        if state is _R.HEADER_TAIL:
            assert data is not None
            _, flags, kind, cookie, length = STRUCTURED_REPLY.unpack(self._head + data)
            return self._on_chunk(flags, kind, cookie, length, None)
        if state is _R.DATA_OFFSET:
            assert data is not None
            return self._on_data_offset(data)
        if state is _R.DATA:
            return self._on_data_done()
        if state is _R.SIMPLE_DATA:
            req = self._req
            assert req is not None
            req.covered = req.length
            return self._complete(req)
        assert data is not None
        return self._on_payload(data)

    def _expect(self, state: _R, need: int | memoryview | PipeTarget) -> None:
        self._state = state
        self._need = need

    def _expect_header(self) -> None:
        self._req = None
        self._expect(_R.HEADER, EXT_REPLY.size if self.extended else 16)

    def _lookup(self, cookie: int) -> Request:
        req = self.in_flight.get(cookie)
        if req is None:
            raise ProtocolError(f"reply with unknown cookie {cookie}")
        return req

    def _on_simple(self, data: bytes) -> Request | None:
        _, error, cookie = SIMPLE_REPLY.unpack(data)
        req = self._lookup(cookie)
        if req.command == Cmd.READ and self.structured:
            raise ProtocolError("simple reply to a read after structured replies")
        if error:
            req.error = RequestError.from_wire(error)
            return self._complete(req)
        if req.command == Cmd.READ and req.length:
            self._req = req
            if req.pipe is not None:
                self._expect(_R.SIMPLE_DATA, PipeTarget(req.pipe, req.length))
                return None
            assert req.buffer is not None
            self._expect(_R.SIMPLE_DATA, req.buffer)
            return None
        return self._complete(req)

    def _on_ext_header(self, data: bytes) -> Request | None:
        magic, flags, kind, cookie, offset, length = EXT_REPLY.unpack(data)
        if magic != EXTENDED_REPLY_MAGIC:
            raise ProtocolError(f"bad extended reply magic {magic:#x}")
        req = self._lookup(cookie)
        if offset != req.offset:
            raise ProtocolError(f"reply offset {offset} != request offset {req.offset}")
        return self._on_chunk(flags, kind, cookie, length, req)

    def _on_chunk(
        self, flags: int, kind: int, cookie: int, length: int, req: Request | None
    ) -> Request | None:
        if req is None:
            req = self._lookup(cookie)
        self._req = req
        self._chunk_flags = flags
        self._chunk_type = kind
        self._chunk_len = length
        if kind == ReplyType.NONE:
            if length != 0:
                raise ProtocolError("NBD_REPLY_TYPE_NONE with a payload")
            if not flags & REPLY_FLAG_DONE:
                raise ProtocolError("NBD_REPLY_TYPE_NONE without the DONE flag")
            return self._complete(req)
        if kind == ReplyType.OFFSET_DATA:
            if req.command != Cmd.READ:
                raise ProtocolError("data chunk in reply to a non-read")
            if length <= 8 or length - 8 > req.length:
                raise ProtocolError(
                    f"data chunk of {length} bytes for a read of " f"{req.length}"
                )
            self._expect(_R.DATA_OFFSET, 8)
            return None
        if kind == ReplyType.OFFSET_HOLE:
            if req.command != Cmd.READ:
                raise ProtocolError("hole chunk in reply to a non-read")
            if length != HOLE.size:
                raise ProtocolError(f"hole chunk of {length} bytes")
        elif kind == ReplyType.BLOCK_STATUS:
            if req.command != Cmd.BLOCK_STATUS or self.extended:
                raise ProtocolError("unexpected NBD_REPLY_TYPE_BLOCK_STATUS")
            count, rest = divmod(length - 4, DESC.size)
            if length < 4 + DESC.size or rest or count > MAX_DESCRIPTORS:
                raise ProtocolError(f"block status chunk of {length} bytes")
        elif kind == ReplyType.BLOCK_STATUS_EXT:
            if req.command != Cmd.BLOCK_STATUS or not self.extended:
                raise ProtocolError("unexpected NBD_REPLY_TYPE_BLOCK_STATUS_EXT")
            count, rest = divmod(length - 8, EXT_DESC.size)
            if length < 8 + EXT_DESC.size or rest or count > MAX_DESCRIPTORS:
                raise ProtocolError(f"block status chunk of {length} bytes")
        elif kind & REPLY_TYPE_ERROR_BIT:
            if length > MAX_ERROR_PAYLOAD:
                raise ProtocolError(f"error chunk of {length} bytes")
        else:
            raise ProtocolError(f"unknown reply chunk type {kind}")
        if length == 0:
            return self._on_payload(b"")
        self._expect(_R.PAYLOAD, length)
        return None

    def _on_data_offset(self, data: bytes) -> Request | None:
        req = self._req
        assert req is not None
        (offset,) = U64.unpack(data)
        size = self._chunk_len - 8
        start = offset - req.offset
        if req.pipe is not None:
            self._check_in_order(req, start)
            self._claim(req, start, size)
            self._expect(_R.DATA, PipeTarget(req.pipe, size))
            return None
        assert req.buffer is not None
        self._claim(req, start, size)
        self._data_range = (start, start + size)
        self._expect(_R.DATA, req.buffer[start : start + size])
        return None

    @staticmethod
    def _check_in_order(req: Request, start: int) -> None:
        """A pipe takes bytes in order only; the read was sent with
        NBD_CMD_FLAG_DF, so a server that fragments it broke the protocol."""
        if start != req.covered:
            raise ProtocolError(
                f"chunk at {req.offset + start} out of order in a read sent "
                f"with NBD_CMD_FLAG_DF")

    def _claim(self, req: Request, start: int, size: int) -> None:
        """Check a data or hole chunk lies inside the request and overlaps
        no earlier chunk, then record it."""
        end = start + size
        if start < 0 or end > req.length:
            raise ProtocolError(
                f"chunk [{req.offset + start}, {req.offset + end}) outside the "
                f"request [{req.offset}, {req.offset + req.length})"
            )
        ranges = req.ranges
        i = bisect_left(ranges, (start, end))
        if (i > 0 and ranges[i - 1][1] > start) or (
            i < len(ranges) and ranges[i][0] < end
        ):
            raise ProtocolError(f"chunk at {req.offset + start} overlaps another")
        ranges.insert(i, (start, end))
        req.covered += size

    def _on_data_done(self) -> Request | None:
        req = self._req
        assert req is not None
        return self._chunk_end(req)

    def _chunk_end(self, req: Request) -> Request | None:
        if self._chunk_flags & REPLY_FLAG_DONE:
            return self._complete(req)
        self._expect_header()
        return None

    def _on_payload(self, data: bytes) -> Request | None:
        req = self._req
        assert req is not None
        kind = self._chunk_type
        if kind == ReplyType.OFFSET_HOLE:
            offset, size = HOLE.unpack(data)
            if size == 0:
                raise ProtocolError("hole chunk of zero length")
            start = offset - req.offset
            if req.pipe is not None:
                self._check_in_order(req, start)
                self._claim(req, start, size)
                self._expect(_R.DATA, PipeTarget(req.pipe, size, zeros=True))
                return None
            self._claim(req, start, size)
            assert req.buffer is not None
            _zero_fill(req.buffer[start : start + size])
        elif kind == ReplyType.BLOCK_STATUS:
            (ctx,) = U32.unpack_from(data)
            self._add_status(req, ctx, list(DESC.iter_unpack(memoryview(data)[4:])))
        elif kind == ReplyType.BLOCK_STATUS_EXT:
            ctx, count = struct.unpack_from(">II", data)
            if count * EXT_DESC.size != len(data) - 8:
                raise ProtocolError("descriptor count does not match chunk length")
            descs = list(EXT_DESC.iter_unpack(memoryview(data)[8:]))
            self._add_status(req, ctx, descs)
        else:
            self._on_error_chunk(req, kind, data)
        return self._chunk_end(req)

    def _add_status(self, req: Request, ctx: int, descs: list[tuple[int, int]]) -> None:
        if ctx not in self.context_ids:
            raise ProtocolError(f"block status for unknown context id {ctx}")
        if ctx in req.statuses:
            raise ProtocolError(f"two block status chunks for context id {ctx}")
        for length, _ in descs:
            if length == 0:
                raise ProtocolError("block status descriptor of zero length")
        req.statuses[ctx] = descs

    def _on_error_chunk(self, req: Request, kind: int, data: bytes) -> None:
        error = 22  # NBD_EINVAL for an unknown error type without fields
        message = ""
        offset: int | None = None
        if len(data) >= ERROR.size:
            error, msg_len = ERROR.unpack_from(data)
            tail = len(data) - ERROR.size - msg_len
            if kind == ReplyType.ERROR and tail != 0:
                raise ProtocolError("error chunk length does not match its message")
            if kind == ReplyType.ERROR_OFFSET and tail != 8:
                raise ProtocolError("error chunk length does not match its message")
            if tail < 0:
                raise ProtocolError("error message longer than its chunk")
            message = data[6 : 6 + msg_len].decode("utf-8", "replace")
            if kind == ReplyType.ERROR_OFFSET:
                (where,) = U64.unpack_from(data, 6 + msg_len)
                if not req.offset <= where < req.offset + max(req.length, 1):
                    raise ProtocolError(f"error offset {where} outside the request")
                offset = where
            if error == 0:
                raise ProtocolError("error chunk with error value 0")
        elif kind in (ReplyType.ERROR, ReplyType.ERROR_OFFSET):
            raise ProtocolError(f"error chunk of {len(data)} bytes")
        if req.error is None:
            req.error = RequestError.from_wire(error, message, offset)

    def _complete(self, req: Request) -> Request:
        if req.error is None:
            if req.command == Cmd.READ and req.covered != req.length:
                raise ProtocolError(
                    f"read reply covers {req.covered} of {req.length} bytes"
                )
            if req.command == Cmd.BLOCK_STATUS:
                missing = self.context_ids - req.statuses.keys()
                if missing:
                    raise ProtocolError(
                        f"block status reply lacks contexts {sorted(missing)}"
                    )
        del self.in_flight[req.cookie]
        req.done = True
        self._expect_header()
        return req
