"""The NBD handshake, without I/O: option requests and a state machine fed
the server's bytes that answers the bytes to send, until the export is
open (``ExportInfo``) or refused (an ``OptionError``). Fixed newstyle;
structured replies, optional extended headers, meta contexts, NBD_OPT_GO
with block sizes, and NBD_OPT_EXPORT_NAME where GO is unsupported."""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field

from .errors import (
    DirtyBitmapError,
    OptionUnsupported,
    ProtocolError,
    option_error,
)
from .wire import (
    ALLOCATION_DEPTH,
    BASE_ALLOCATION,
    DEFAULT_MAX_PAYLOAD,
    DIRTY_BITMAP_PREFIX,
    EXPORT_NAME_REPLY,
    FLAG_FIXED_NEWSTYLE,
    FLAG_NO_ZEROES,
    GREETING,
    IHAVEOPT,
    MAX_MIN_BLOCK_SIZE,
    MAX_OPTION_REPLY,
    NBDMAGIC,
    OPTION,
    OPTION_REPLY,
    OPTION_REPLY_MAGIC,
    REP_ERROR_BIT,
    U16,
    U32,
    U32_MAX,
    Info,
    Opt,
    Rep,
)

# --- option requests---------------------------------------------------------


def pack_option(option: int, data: bytes = b"") -> bytes:
    """One option request: IHAVEOPT, option, length, data."""
    return OPTION.pack(IHAVEOPT, option, len(data)) + data


def _string32(text: str) -> bytes:
    raw = text.encode("utf-8")
    if len(raw) > 4096:
        raise ValueError("NBD strings are limited to 4096 bytes")
    return U32.pack(len(raw)) + raw


def pack_go(export_name: str, info_requests: tuple[int, ...] = ()) -> bytes:
    """NBD_OPT_GO data: export name and the NBD_INFO_* items wanted."""
    data = _string32(export_name) + U16.pack(len(info_requests))
    data += b"".join(U16.pack(i) for i in info_requests)
    return pack_option(Opt.GO, data)


def pack_meta_context(option: int, export_name: str, queries: tuple[str, ...]) -> bytes:
    """NBD_OPT_LIST_META_CONTEXT / SET_META_CONTEXT data."""
    data = _string32(export_name) + U32.pack(len(queries))
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
            need = GREETING.size
        elif self.state is HandshakeState.OPTION_HEADER:
            need = OPTION_REPLY.size
        elif self.state is HandshakeState.OPTION_PAYLOAD:
            need = self._reply[2]
        elif self.state is HandshakeState.EXPORT_NAME_REPLY:
            need = EXPORT_NAME_REPLY.size + (0 if self._no_zeroes else 124)
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
            self._on_greeting(self._take(GREETING.size))
        elif self.state is HandshakeState.OPTION_HEADER:
            self._on_option_header(self._take(OPTION_REPLY.size))
        elif self.state is HandshakeState.OPTION_PAYLOAD:
            option, reply, length = self._reply
            self.state = HandshakeState.OPTION_HEADER
            self._on_option_reply(option, reply, self._take(length))
        elif self.state is HandshakeState.EXPORT_NAME_REPLY:
            raw = self._take(EXPORT_NAME_REPLY.size + (0 if self._no_zeroes else 124))
            size, flags = EXPORT_NAME_REPLY.unpack_from(raw)
            self._export = (size, flags)
            self._finish(used_export_name=True)

    def _on_greeting(self, raw: bytes) -> None:
        magic, opt_magic, flags = GREETING.unpack(raw)
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
        self._out += U32.pack(client_flags)
        if self.config.extended_headers:
            self._send(_Step.EXTENDED_HEADERS, pack_option(Opt.EXTENDED_HEADERS))
        else:
            self._send(_Step.STRUCTURED_REPLY, pack_option(Opt.STRUCTURED_REPLY))

    def _send(self, step: _Step, data: bytes) -> None:
        self._step = step
        self._out += data
        self.state = HandshakeState.OPTION_HEADER

    def _on_option_header(self, raw: bytes) -> None:
        magic, option, reply, length = OPTION_REPLY.unpack(raw)
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
                (ctx_id,) = U32.unpack_from(payload)
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
        (kind,) = U16.unpack_from(payload)
        if kind == Info.EXPORT:
            if len(payload) != 12:
                raise ProtocolError("bad NBD_INFO_EXPORT length")
            size, flags = EXPORT_NAME_REPLY.unpack_from(payload, 2)
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
