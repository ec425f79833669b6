"""The NBD wire protocol, without I/O.

Like h11 for HTTP, nothing here touches a socket: the handshake is a state
machine fed with bytes that produces bytes to send, and the transmission
phase is a ``Transmission`` object that packs requests and decodes replies
from bytes the caller reads. So every rule of the protocol can be checked
by table tests without a server, and the socket layer (``client.py``) stays
a thin loop.

Reading replies is driven by ``Transmission.need()``: it answers either a
byte count (read exactly that many bytes and pass them to ``received``) or
a ``memoryview`` (fill it completely, then call ``received(None)``). The
views are slices of the caller's own read buffer, checked against the
request first, so the payload of a read reply goes straight from the
socket into place with one copy, and a server can never make the client
write outside the range it asked for.

Strictness: anything that would desynchronise the stream or that the
protocol forbids raises ``ProtocolError`` (the connection must be dropped);
a failed command sets ``Request.error`` and the connection goes on.
Specification: NetworkBlockDevice/nbd doc/proto.md; extended headers from
its extension-ext-header branch.
"""

from __future__ import annotations

import enum
import struct
from bisect import bisect_left
from dataclasses import dataclass, field

from .errors import (
    DirtyBitmapError,
    OptionUnsupported,
    ProtocolError,
    RequestError,
    option_error,
)

# --- magics-------------------------------------------------------------------

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPTION_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
EXTENDED_REQUEST_MAGIC = 0x21E41C71
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF
EXTENDED_REPLY_MAGIC = 0x6E8A278C

# Handshake flags (server) and client flags share bit values.
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1


class Opt(enum.IntEnum):
    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


class Rep(enum.IntEnum):
    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = 0x80000001
    ERR_POLICY = 0x80000002
    ERR_INVALID = 0x80000003
    ERR_PLATFORM = 0x80000004
    ERR_TLS_REQD = 0x80000005
    ERR_UNKNOWN = 0x80000006
    ERR_SHUTDOWN = 0x80000007
    ERR_BLOCK_SIZE_REQD = 0x80000008
    ERR_TOO_BIG = 0x80000009
    ERR_EXT_HEADER_REQD = 0x8000000A


REP_ERROR_BIT = 1 << 31


class Info(enum.IntEnum):
    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class Cmd(enum.IntEnum):
    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7
    RESIZE = 8


class CmdFlag(enum.IntFlag):
    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4
    PAYLOAD_LEN = 1 << 5


class TxFlag(enum.IntFlag):
    """Transmission flags of an export (NBD_FLAG_*)."""

    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11
    BLOCK_STATUS_PAYLOAD = 1 << 12


class ReplyType(enum.IntEnum):
    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    BLOCK_STATUS_EXT = 6
    ERROR = (1 << 15) + 1
    ERROR_OFFSET = (1 << 15) + 2


REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_ERROR_BIT = 1 << 15

# Metadata contexts this client understands.
BASE_ALLOCATION = "base:allocation"
ALLOCATION_DEPTH = "qemu:allocation-depth"
DIRTY_BITMAP_PREFIX = "qemu:dirty-bitmap:"

STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1
STATE_DIRTY = 1 << 0

# --- limits-------------------------------------------------------------------

#: Largest option reply payload accepted. Replies carry names and messages,
#: which the protocol caps at 4096 bytes; a bigger length is a broken server.
MAX_OPTION_REPLY = 64 * 1024

#: The payload every server must accept when it advertises no maximum
#: (doc/proto.md "Block size constraints").
DEFAULT_MAX_PAYLOAD = 32 * 1024 * 1024

#: Descriptors accepted in one block status chunk. The protocol says a
#: server SHOULD NOT send more than 2^20; this bounds a reply to 8 MiB
#: (16 MiB with extended headers).
MAX_DESCRIPTORS = 1 << 20

#: Largest error chunk payload: error, message length, a message of at most
#: 4096 bytes (the protocol's string limit), and an optional offset.
MAX_ERROR_PAYLOAD = 4 + 2 + 4096 + 8

#: Block sizes a server may advertise: a minimum above 64 KiB is invalid
#: by the protocol.
MAX_MIN_BLOCK_SIZE = 64 * 1024

_GREETING = struct.Struct(">QQH")
_OPTION = struct.Struct(">QII")
_OPTION_REPLY = struct.Struct(">QIII")
_EXPORT_NAME_REPLY = struct.Struct(">QH")
_REQUEST = struct.Struct(">IHHQQI")
_EXT_REQUEST = struct.Struct(">IHHQQQ")
_SIMPLE_REPLY = struct.Struct(">IIQ")
_STRUCTURED_REPLY = struct.Struct(">IHHQI")
_EXT_REPLY = struct.Struct(">IHHQQQ")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_HOLE = struct.Struct(">QI")
_ERROR = struct.Struct(">IH")
_DESC = struct.Struct(">II")
_EXT_DESC = struct.Struct(">QQ")

U32_MAX = (1 << 32) - 1
U64_MAX = (1 << 64) - 1


# --- option requests---------------------------------------------------------


def pack_option(option: int, data: bytes = b"") -> bytes:
    """One option request: IHAVEOPT, option, length, data."""
    return _OPTION.pack(IHAVEOPT, option, len(data)) + data


def _string32(text: str) -> bytes:
    raw = text.encode("utf-8")
    if len(raw) > 4096:
        raise ValueError("NBD strings are limited to 4096 bytes")
    return _U32.pack(len(raw)) + raw


def pack_go(export_name: str, info_requests: tuple[int, ...] = ()) -> bytes:
    """NBD_OPT_GO data: export name and the NBD_INFO_* items wanted."""
    data = _string32(export_name) + _U16.pack(len(info_requests))
    data += b"".join(_U16.pack(i) for i in info_requests)
    return pack_option(Opt.GO, data)


def pack_meta_context(option: int, export_name: str, queries: tuple[str, ...]) -> bytes:
    """NBD_OPT_LIST_META_CONTEXT / SET_META_CONTEXT data."""
    data = _string32(export_name) + _U32.pack(len(queries))
    data += b"".join(_string32(q) for q in queries)
    return pack_option(option, data)


# --- handshake---------------------------------------------------------------


class HandshakeState(enum.Enum):
    """Where the handshake is. Transitions (one table):

    GREETING --(server greeting)--> OPTION_HEADER   option sent
    OPTION_HEADER --(reply header)--> OPTION_PAYLOAD
    OPTION_PAYLOAD --(non-final reply)--> OPTION_HEADER   same option
    OPTION_PAYLOAD --(final reply)--> OPTION_HEADER   next option sent
    OPTION_PAYLOAD --(GO acknowledged)--> DONE
    OPTION_PAYLOAD --(GO unsupported)--> EXPORT_NAME_REPLY   legacy fallback
    EXPORT_NAME_REPLY --(size and flags)--> DONE
    any --(violation or refusal)--> FAILED
    """

    GREETING = "greeting"
    OPTION_HEADER = "option-header"
    OPTION_PAYLOAD = "option-payload"
    EXPORT_NAME_REPLY = "export-name-reply"
    DONE = "done"
    FAILED = "failed"


#: Ask LIST_META_CONTEXT for the bitmaps instead of naming one.
FIND_BITMAP = True


@dataclass(frozen=True)
class HandshakeConfig:
    """What the client wants from the handshake.

    ``dirty_bitmap``: None for no bitmap, a name, or ``FIND_BITMAP`` to
    select the only bitmap the export offers.
    """

    export_name: str = ""
    extended_headers: bool = False
    allocation_depth: bool = True
    dirty_bitmap: str | bool | None = None


@dataclass(frozen=True)
class ExportInfo:
    """What the handshake learned about the export."""

    size: int
    flags: int
    min_block: int = 1
    preferred_block: int = 4096
    max_payload: int = DEFAULT_MAX_PAYLOAD
    block_size_advertised: bool = False
    structured_replies: bool = False
    extended_headers: bool = False
    contexts: dict[str, int] = field(default_factory=dict)
    used_export_name: bool = False


class _Step(enum.Enum):
    EXTENDED_HEADERS = 1
    STRUCTURED_REPLY = 2
    LIST_BITMAPS = 3
    SET_META_CONTEXT = 4
    GO = 5
    EXPORT_NAME = 6


class Handshake:
    """Fixed newstyle negotiation as a state machine.

    Use: ``send(h.data_to_send())``; then while ``h.state`` is not DONE,
    read exactly ``h.bytes_needed()`` bytes, ``h.receive_data(them)`` and
    send ``h.data_to_send()``. Reading exactly what is needed leaves the
    first byte of the transmission phase in the socket. Refusals raise the
    precise ``OptionError``; violations raise ``ProtocolError``.

    The sequence: [EXTENDED_HEADERS] -> STRUCTURED_REPLY (unless extended
    headers were accepted) -> [LIST_META_CONTEXT qemu:dirty-bitmap:] ->
    SET_META_CONTEXT -> GO with INFO_BLOCK_SIZE, falling back to
    EXPORT_NAME when GO is unknown.
    """

    def __init__(self, config: HandshakeConfig) -> None:
        self.config = config
        self.state = HandshakeState.GREETING
        self.info: ExportInfo | None = None
        self._buf = bytearray()
        self._out = bytearray()
        self._step: _Step | None = None
        self._no_zeroes = False
        self._structured = False
        self._extended = False
        self._bitmap: str | None = None
        self._found_bitmaps: list[str] = []
        self._contexts: dict[str, int] = {}
        self._export: tuple[int, int] | None = None
        self._block_size: tuple[int, int, int] | None = None
        self._reply: tuple[int, int, int] = (0, 0, 0)

    # -- I/O facing API

    @property
    def unused_data(self) -> bytes:
        """Bytes fed past the end of the handshake (transmission data)."""
        return bytes(self._buf)

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def bytes_needed(self) -> int:
        """Bytes to read next; never more than the step needs."""
        if self.state is HandshakeState.GREETING:
            need = _GREETING.size
        elif self.state is HandshakeState.OPTION_HEADER:
            need = _OPTION_REPLY.size
        elif self.state is HandshakeState.OPTION_PAYLOAD:
            need = self._reply[2]
        elif self.state is HandshakeState.EXPORT_NAME_REPLY:
            need = _EXPORT_NAME_REPLY.size + (0 if self._no_zeroes else 124)
        else:
            return 0
        return need - len(self._buf)

    def receive_data(self, data: bytes) -> None:
        if self.state in (HandshakeState.DONE, HandshakeState.FAILED):
            raise ProtocolError(f"handshake data in state {self.state.value}")
        self._buf += data
        try:
            while self.state not in (HandshakeState.DONE, HandshakeState.FAILED):
                need = self.bytes_needed()
                if need > 0:
                    return
                self._advance()
        except BaseException:
            self.state = HandshakeState.FAILED
            raise

    # -- transitions

    def _take(self, n: int) -> bytes:
        data = bytes(self._buf[:n])
        del self._buf[:n]
        return data

    def _advance(self) -> None:
        if self.state is HandshakeState.GREETING:
            self._on_greeting(self._take(_GREETING.size))
        elif self.state is HandshakeState.OPTION_HEADER:
            self._on_option_header(self._take(_OPTION_REPLY.size))
        elif self.state is HandshakeState.OPTION_PAYLOAD:
            option, reply, length = self._reply
            self.state = HandshakeState.OPTION_HEADER
            self._on_option_reply(option, reply, self._take(length))
        elif self.state is HandshakeState.EXPORT_NAME_REPLY:
            raw = self._take(_EXPORT_NAME_REPLY.size + (0 if self._no_zeroes else 124))
            size, flags = _EXPORT_NAME_REPLY.unpack_from(raw)
            self._export = (size, flags)
            self._finish(used_export_name=True)

    def _on_greeting(self, raw: bytes) -> None:
        magic, opt_magic, flags = _GREETING.unpack(raw)
        if magic != NBDMAGIC:
            raise ProtocolError(f"not an NBD server (magic {magic:#x})")
        if opt_magic != IHAVEOPT:
            raise ProtocolError("server speaks oldstyle negotiation, not supported")
        if not flags & FLAG_FIXED_NEWSTYLE:
            raise ProtocolError("server lacks fixed newstyle negotiation")
        client_flags = FLAG_FIXED_NEWSTYLE
        if flags & FLAG_NO_ZEROES:
            client_flags |= FLAG_NO_ZEROES
            self._no_zeroes = True
        self._out += _U32.pack(client_flags)
        if self.config.extended_headers:
            self._send(_Step.EXTENDED_HEADERS, pack_option(Opt.EXTENDED_HEADERS))
        else:
            self._send(_Step.STRUCTURED_REPLY, pack_option(Opt.STRUCTURED_REPLY))

    def _send(self, step: _Step, data: bytes) -> None:
        self._step = step
        self._out += data
        self.state = HandshakeState.OPTION_HEADER

    def _on_option_header(self, raw: bytes) -> None:
        magic, option, reply, length = _OPTION_REPLY.unpack(raw)
        if magic != OPTION_REPLY_MAGIC:
            raise ProtocolError(f"bad option reply magic {magic:#x}")
        expected = _STEP_OPTION[self._step] if self._step else None
        if option != expected:
            raise ProtocolError(f"reply for option {option}, expected {expected}")
        if length > MAX_OPTION_REPLY:
            raise ProtocolError(f"option reply of {length} bytes is too large")
        self._reply = (option, reply, length)
        self.state = HandshakeState.OPTION_PAYLOAD

    def _on_option_reply(self, option: int, reply: int, payload: bytes) -> None:
        if reply & REP_ERROR_BIT:
            message = payload.decode("utf-8", "replace")
            self._on_option_error(option, option_error(option, reply, message))
            return
        step = self._step
        if step in (_Step.EXTENDED_HEADERS, _Step.STRUCTURED_REPLY):
            if reply != Rep.ACK:
                raise ProtocolError(f"unexpected reply {reply} to option {option}")
            if step is _Step.EXTENDED_HEADERS:
                self._extended = True
            else:
                self._structured = True
            self._after_reply_mode()
        elif step in (_Step.LIST_BITMAPS, _Step.SET_META_CONTEXT):
            if reply == Rep.META_CONTEXT:
                if len(payload) < 4:
                    raise ProtocolError("short NBD_REP_META_CONTEXT")
                (ctx_id,) = _U32.unpack_from(payload)
                name = payload[4:].decode("utf-8", "replace")
                if step is _Step.LIST_BITMAPS:
                    if name.startswith(DIRTY_BITMAP_PREFIX):
                        self._found_bitmaps.append(name[len(DIRTY_BITMAP_PREFIX) :])
                else:
                    if name not in self._queries():
                        raise ProtocolError(f"server selected unasked context {name}")
                    self._contexts[name] = ctx_id
            elif reply == Rep.ACK:
                if step is _Step.LIST_BITMAPS:
                    self._after_list_bitmaps()
                else:
                    self._after_set_meta_context()
            else:
                raise ProtocolError(f"unexpected reply {reply} to option {option}")
        elif step is _Step.GO:
            if reply == Rep.INFO:
                self._on_info(payload)
            elif reply == Rep.ACK:
                self._finish(used_export_name=False)
            else:
                raise ProtocolError(f"unexpected reply {reply} to NBD_OPT_GO")
        else:
            raise ProtocolError(f"unexpected reply {reply} to option {option}")

    def _on_option_error(self, option: int, error: Exception) -> None:
        step = self._step
        unsupported = isinstance(error, OptionUnsupported)
        if step is _Step.EXTENDED_HEADERS and unsupported:
            # Compact headers it is; structured replies are still wanted.
            self._send(_Step.STRUCTURED_REPLY, pack_option(Opt.STRUCTURED_REPLY))
        elif step is _Step.STRUCTURED_REPLY and unsupported:
            self._send_go()
        elif step is _Step.SET_META_CONTEXT and unsupported:
            self._contexts.clear()
            self._after_set_meta_context()
        elif step is _Step.LIST_BITMAPS and unsupported:
            raise DirtyBitmapError("server cannot list metadata contexts") from error
        elif step is _Step.GO and unsupported and not self._extended:
            self._contexts.clear()
            self._step = _Step.EXPORT_NAME
            self._out += pack_option(
                Opt.EXPORT_NAME, self.config.export_name.encode("utf-8")
            )
            self.state = HandshakeState.EXPORT_NAME_REPLY
        else:
            raise error

    def _after_reply_mode(self) -> None:
        if self.config.dirty_bitmap is True:
            self._send(
                _Step.LIST_BITMAPS,
                pack_meta_context(
                    Opt.LIST_META_CONTEXT,
                    self.config.export_name,
                    (DIRTY_BITMAP_PREFIX,),
                ),
            )
            return
        if isinstance(self.config.dirty_bitmap, str):
            self._bitmap = self.config.dirty_bitmap
        self._send_set_meta_context()

    def _after_list_bitmaps(self) -> None:
        if not self._found_bitmaps:
            raise DirtyBitmapError("the export has no dirty bitmap")
        if len(self._found_bitmaps) > 1:
            names = ", ".join(sorted(self._found_bitmaps))
            raise DirtyBitmapError(
                f"the export has several dirty bitmaps ({names}): name one"
            )
        self._bitmap = self._found_bitmaps[0]
        self._send_set_meta_context()

    def _queries(self) -> tuple[str, ...]:
        queries = [BASE_ALLOCATION]
        if self.config.allocation_depth:
            queries.append(ALLOCATION_DEPTH)
        if self._bitmap is not None:
            queries.append(DIRTY_BITMAP_PREFIX + self._bitmap)
        return tuple(queries)

    def _send_set_meta_context(self) -> None:
        self._send(
            _Step.SET_META_CONTEXT,
            pack_meta_context(
                Opt.SET_META_CONTEXT, self.config.export_name, self._queries()
            ),
        )

    def _after_set_meta_context(self) -> None:
        if self._bitmap is not None:
            name = DIRTY_BITMAP_PREFIX + self._bitmap
            if name not in self._contexts:
                raise DirtyBitmapError(f"the export offers no bitmap {self._bitmap!r}")
        self._send_go()

    def _send_go(self) -> None:
        if not (self._structured or self._extended):
            self._contexts.clear()
        self._send(_Step.GO, pack_go(self.config.export_name, (Info.BLOCK_SIZE,)))

    def _on_info(self, payload: bytes) -> None:
        if len(payload) < 2:
            raise ProtocolError("short NBD_REP_INFO")
        (kind,) = _U16.unpack_from(payload)
        if kind == Info.EXPORT:
            if len(payload) != 12:
                raise ProtocolError("bad NBD_INFO_EXPORT length")
            size, flags = _EXPORT_NAME_REPLY.unpack_from(payload, 2)
            self._export = (size, flags)
        elif kind == Info.BLOCK_SIZE:
            if len(payload) != 14:
                raise ProtocolError("bad NBD_INFO_BLOCK_SIZE length")
            minimum, preferred, maximum = struct.unpack_from(">III", payload, 2)
            _check_block_size(minimum, preferred, maximum)
            self._block_size = (minimum, preferred, maximum)
        # Unknown info types must be ignored.

    def _finish(self, used_export_name: bool) -> None:
        if self._export is None:
            raise ProtocolError("server acknowledged GO without NBD_INFO_EXPORT")
        size, flags = self._export
        if size > (1 << 63) - 1:
            raise ProtocolError(f"export size {size} is out of range")
        kwargs: dict[str, int | bool] = {}
        if self._block_size is not None:
            minimum, preferred, maximum = self._block_size
            kwargs = {
                "min_block": minimum,
                "preferred_block": preferred,
                "max_payload": maximum,
                "block_size_advertised": True,
            }
        self.info = ExportInfo(
            size=size,
            flags=flags,
            structured_replies=self._structured or self._extended,
            extended_headers=self._extended,
            contexts=dict(self._contexts),
            used_export_name=used_export_name,
            **kwargs,  # type: ignore[arg-type]
        )
        self._step = None
        self.state = HandshakeState.DONE


_STEP_OPTION = {
    _Step.EXTENDED_HEADERS: Opt.EXTENDED_HEADERS,
    _Step.STRUCTURED_REPLY: Opt.STRUCTURED_REPLY,
    _Step.LIST_BITMAPS: Opt.LIST_META_CONTEXT,
    _Step.SET_META_CONTEXT: Opt.SET_META_CONTEXT,
    _Step.GO: Opt.GO,
    _Step.EXPORT_NAME: Opt.EXPORT_NAME,
}


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _check_block_size(minimum: int, preferred: int, maximum: int) -> None:
    if not _is_power_of_two(minimum) or minimum > MAX_MIN_BLOCK_SIZE:
        raise ProtocolError(f"invalid minimum block size {minimum}")
    if not _is_power_of_two(preferred) or preferred < minimum:
        raise ProtocolError(f"invalid preferred block size {preferred}")
    if maximum < minimum or (maximum != U32_MAX and maximum % minimum):
        raise ProtocolError(f"invalid maximum payload {maximum}")


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
        return _EXT_REQUEST.pack(
            EXTENDED_REQUEST_MAGIC, flags, command, cookie, offset, length
        )
    if length > U32_MAX:
        raise ValueError(f"length {length} does not fit a compact request")
    return _REQUEST.pack(REQUEST_MAGIC, flags, command, cookie, offset, length)


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
            _EXT_REPLY.size if self.extended else 16)
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
            (magic,) = _U32.unpack_from(data)
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
            _, flags, kind, cookie, length = _STRUCTURED_REPLY.unpack(self._head + data)
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
        self._expect(_R.HEADER, _EXT_REPLY.size if self.extended else 16)

    def _lookup(self, cookie: int) -> Request:
        req = self.in_flight.get(cookie)
        if req is None:
            raise ProtocolError(f"reply with unknown cookie {cookie}")
        return req

    def _on_simple(self, data: bytes) -> Request | None:
        _, error, cookie = _SIMPLE_REPLY.unpack(data)
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
        magic, flags, kind, cookie, offset, length = _EXT_REPLY.unpack(data)
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
            if length != _HOLE.size:
                raise ProtocolError(f"hole chunk of {length} bytes")
        elif kind == ReplyType.BLOCK_STATUS:
            if req.command != Cmd.BLOCK_STATUS or self.extended:
                raise ProtocolError("unexpected NBD_REPLY_TYPE_BLOCK_STATUS")
            count, rest = divmod(length - 4, _DESC.size)
            if length < 4 + _DESC.size or rest or count > MAX_DESCRIPTORS:
                raise ProtocolError(f"block status chunk of {length} bytes")
        elif kind == ReplyType.BLOCK_STATUS_EXT:
            if req.command != Cmd.BLOCK_STATUS or not self.extended:
                raise ProtocolError("unexpected NBD_REPLY_TYPE_BLOCK_STATUS_EXT")
            count, rest = divmod(length - 8, _EXT_DESC.size)
            if length < 8 + _EXT_DESC.size or rest or count > MAX_DESCRIPTORS:
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
        (offset,) = _U64.unpack(data)
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
            offset, size = _HOLE.unpack(data)
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
            (ctx,) = _U32.unpack_from(data)
            self._add_status(req, ctx, list(_DESC.iter_unpack(memoryview(data)[4:])))
        elif kind == ReplyType.BLOCK_STATUS_EXT:
            ctx, count = struct.unpack_from(">II", data)
            if count * _EXT_DESC.size != len(data) - 8:
                raise ProtocolError("descriptor count does not match chunk length")
            descs = list(_EXT_DESC.iter_unpack(memoryview(data)[8:]))
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
        if len(data) >= _ERROR.size:
            error, msg_len = _ERROR.unpack_from(data)
            tail = len(data) - _ERROR.size - msg_len
            if kind == ReplyType.ERROR and tail != 0:
                raise ProtocolError("error chunk length does not match its message")
            if kind == ReplyType.ERROR_OFFSET and tail != 8:
                raise ProtocolError("error chunk length does not match its message")
            if tail < 0:
                raise ProtocolError("error message longer than its chunk")
            message = data[6 : 6 + msg_len].decode("utf-8", "replace")
            if kind == ReplyType.ERROR_OFFSET:
                (where,) = _U64.unpack_from(data, 6 + msg_len)
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
