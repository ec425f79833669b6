"""The sans-I/O protocol layer, by tables: no sockets."""

from __future__ import annotations

import struct

import pytest

from diskferry.extent import Extent
from diskferry.nbd import extents as ext
from diskferry.nbd.errors import (
    DirtyBitmapError,
    ExportUnknown,
    OptionUnsupported,
    ProtocolError,
)
from diskferry.nbd.handshake import (
    ExportInfo,
    Handshake,
    HandshakeConfig,
    HandshakeState,
)
from diskferry.nbd.transmission import (
    Request,
    Transmission,
    pack_request,
)
from diskferry.nbd.wire import (
    ALLOCATION_DEPTH,
    BASE_ALLOCATION,
    EXTENDED_REPLY_MAGIC,
    EXTENDED_REQUEST_MAGIC,
    IHAVEOPT,
    NBDMAGIC,
    OPTION_REPLY_MAGIC,
    REPLY_FLAG_DONE,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    Cmd,
    Opt,
    Rep,
    ReplyType,
)

# --- handshake ------------------------------------------------------------------


def greeting(flags: int = 3) -> bytes:
    return struct.pack(">QQH", NBDMAGIC, IHAVEOPT, flags)


def opt_reply(opt: int, rep: int, data: bytes = b"") -> bytes:
    return struct.pack(">QIII", OPTION_REPLY_MAGIC, opt, rep, len(data)) + data


def info_export(size: int = 1 << 20, flags: int = 1) -> bytes:
    return opt_reply(Opt.GO, Rep.INFO, struct.pack(">HQH", 0, size, flags))


def run(hs: Handshake, *chunks: bytes) -> list[bytes]:
    """Feed the server's bytes, byte by byte; return what the client sent."""
    sent = [hs.data_to_send()]
    for chunk in chunks:
        for i in range(len(chunk)):
            hs.receive_data(chunk[i : i + 1])
        sent.append(hs.data_to_send())
    return sent


def options_sent(sent: list[bytes]) -> list[int]:
    data = b"".join(sent)[4:]  # client flags first
    out = []
    while data:
        magic, opt, length = struct.unpack_from(">QII", data)
        assert magic == IHAVEOPT
        out.append(opt)
        data = data[16 + length :]
    return out


def test_handshake_full() -> None:
    hs = Handshake(HandshakeConfig(export_name="e"))
    sent = run(
        hs,
        greeting(),
        opt_reply(Opt.STRUCTURED_REPLY, Rep.ACK),
        opt_reply(
            Opt.SET_META_CONTEXT, Rep.META_CONTEXT, b"\0\0\0\x07base:allocation"
        ),
        opt_reply(Opt.SET_META_CONTEXT, Rep.ACK),
        info_export(12345, 1 | 4),
        opt_reply(Opt.GO, Rep.INFO, struct.pack(">HIII", 3, 512, 4096, 1 << 20)),
        opt_reply(Opt.GO, Rep.INFO, struct.pack(">H", 77) + b"future info"),
        opt_reply(Opt.GO, Rep.ACK),
    )
    assert hs.state is HandshakeState.DONE
    assert hs.bytes_needed() == 0
    assert sent[0] == b""
    assert sent[1][:4] == struct.pack(">I", 3)  # FIXED_NEWSTYLE | NO_ZEROES
    assert options_sent(sent) == [
        Opt.STRUCTURED_REPLY,
        Opt.SET_META_CONTEXT,
        Opt.GO,
    ]
    info = hs.info
    assert info is not None
    assert (info.size, info.flags) == (12345, 5)
    assert (info.min_block, info.preferred_block, info.max_payload) == (
        512,
        4096,
        1 << 20,
    )
    assert info.contexts == {"base:allocation": 7}
    assert info.structured_replies and not info.extended_headers


def test_handshake_extended_then_bitmap_listing() -> None:
    hs = Handshake(HandshakeConfig(extended_headers=True, dirty_bitmap=True))
    sent = run(
        hs,
        greeting(1),
        opt_reply(Opt.EXTENDED_HEADERS, Rep.ACK),
        opt_reply(
            Opt.LIST_META_CONTEXT, Rep.META_CONTEXT, b"\0\0\0\0qemu:dirty-bitmap:b"
        ),
        opt_reply(Opt.LIST_META_CONTEXT, Rep.ACK),
        opt_reply(
            Opt.SET_META_CONTEXT, Rep.META_CONTEXT, b"\0\0\0\x02qemu:dirty-bitmap:b"
        ),
        opt_reply(Opt.SET_META_CONTEXT, Rep.ACK),
        info_export(),
        opt_reply(Opt.GO, Rep.ACK),
    )
    assert sent[1][:4] == struct.pack(">I", 1)  # no NO_ZEROES: not offered
    assert options_sent(sent) == [
        Opt.EXTENDED_HEADERS,
        Opt.LIST_META_CONTEXT,
        Opt.SET_META_CONTEXT,
        Opt.GO,
    ]
    assert hs.info is not None and hs.info.extended_headers
    assert hs.info.contexts == {"qemu:dirty-bitmap:b": 2}
    assert not hs.info.block_size_advertised
    assert hs.info.max_payload == 32 << 20


def test_handshake_go_unsupported_falls_back_to_export_name() -> None:
    hs = Handshake(HandshakeConfig(export_name="x"))
    sent = run(
        hs,
        greeting(1),
        opt_reply(Opt.STRUCTURED_REPLY, Rep.ERR_UNSUP),
        opt_reply(Opt.GO, Rep.ERR_UNSUP),
        struct.pack(">QH", 999, 1) + bytes(124),
    )
    assert options_sent(sent) == [Opt.STRUCTURED_REPLY, Opt.GO, Opt.EXPORT_NAME]
    assert hs.info is not None and hs.info.used_export_name and hs.info.size == 999
    assert not hs.info.structured_replies and hs.info.contexts == {}


@pytest.mark.parametrize(
    ("chunks", "error", "match"),
    [
        ([b"x" * 18], ProtocolError, "not an NBD server"),
        (
            [struct.pack(">QQH", NBDMAGIC, 0x00420281861253, 0)],
            ProtocolError,
            "oldstyle",
        ),
        ([greeting(0)], ProtocolError, "fixed newstyle"),
        ([greeting(), struct.pack(">QIII", 1, 8, 1, 0)], ProtocolError, "magic"),
        ([greeting(), opt_reply(Opt.GO, Rep.ACK)], ProtocolError, "expected"),
        (
            [greeting(), struct.pack(">QIII", OPTION_REPLY_MAGIC, 8, 1, 1 << 30)],
            ProtocolError,
            "too large",
        ),
        (
            [
                greeting(),
                opt_reply(Opt.STRUCTURED_REPLY, Rep.ACK),
                opt_reply(
                    Opt.SET_META_CONTEXT, Rep.META_CONTEXT, b"\0\0\0\1evil:ctx"
                ),
            ],
            ProtocolError,
            "unasked",
        ),
        (
            [
                greeting(),
                opt_reply(Opt.STRUCTURED_REPLY, Rep.ACK),
                opt_reply(Opt.SET_META_CONTEXT, Rep.ACK),
                opt_reply(Opt.GO, Rep.ERR_UNKNOWN, b"no such export"),
            ],
            ExportUnknown,
            "no such export",
        ),
        (
            [
                greeting(),
                opt_reply(Opt.STRUCTURED_REPLY, Rep.ACK),
                opt_reply(Opt.SET_META_CONTEXT, Rep.ACK),
                opt_reply(Opt.GO, Rep.ACK),
            ],
            ProtocolError,
            "without NBD_INFO_EXPORT",
        ),
        (
            [
                greeting(),
                opt_reply(Opt.STRUCTURED_REPLY, Rep.ACK),
                opt_reply(Opt.SET_META_CONTEXT, Rep.ACK),
                opt_reply(
                    Opt.GO, Rep.INFO, struct.pack(">HIII", 3, 3, 4096, 1 << 20)
                ),
            ],
            ProtocolError,
            "minimum block size",
        ),
    ],
)
def test_handshake_failures(
    chunks: list[bytes], error: type[Exception], match: str
) -> None:
    hs = Handshake(HandshakeConfig())
    with pytest.raises(error, match=match):
        run(hs, *chunks)
    assert hs.state is HandshakeState.FAILED
    with pytest.raises(ProtocolError):
        hs.receive_data(b"x")


def test_handshake_go_unsupported_after_extended_is_an_error() -> None:
    hs = Handshake(HandshakeConfig(extended_headers=True))
    with pytest.raises(OptionUnsupported):
        run(
            hs,
            greeting(),
            opt_reply(Opt.EXTENDED_HEADERS, Rep.ACK),
            opt_reply(Opt.SET_META_CONTEXT, Rep.ACK),
            opt_reply(Opt.GO, Rep.ERR_UNSUP),
        )


def test_handshake_bitmap_named_but_missing() -> None:
    hs = Handshake(HandshakeConfig(dirty_bitmap="b9"))
    with pytest.raises(DirtyBitmapError, match="b9"):
        run(
            hs,
            greeting(),
            opt_reply(Opt.STRUCTURED_REPLY, Rep.ACK),
            opt_reply(Opt.SET_META_CONTEXT, Rep.ACK),
        )


# --- transmission ------------------------------------------------------------------

CTX_BASE, CTX_DEPTH = 3, 4


def tx(extended: bool = False, structured: bool = True) -> Transmission:
    info = ExportInfo(
        size=1 << 30,
        flags=1,
        structured_replies=structured,
        extended_headers=extended,
        contexts={BASE_ALLOCATION: CTX_BASE, ALLOCATION_DEPTH: CTX_DEPTH},
    )
    return Transmission(info)


def chunk(
    t: Transmission, req: Request, flags: int, kind: int, payload: bytes
) -> bytes:
    if t.extended:
        return (
            struct.pack(
                ">IHHQQQ",
                EXTENDED_REPLY_MAGIC,
                flags,
                kind,
                req.cookie,
                req.offset,
                len(payload),
            )
            + payload
        )
    return (
        struct.pack(
            ">IHHQI", STRUCTURED_REPLY_MAGIC, flags, kind, req.cookie, len(payload)
        )
        + payload
    )


def feed(t: Transmission, wire: bytes) -> list[Request]:
    """Drive need()/received() over a byte string, as the client does."""
    done = []
    pos = 0
    while pos < len(wire):
        need = t.need()
        if isinstance(need, int):
            got = t.received(wire[pos : pos + need])
            pos += need
        else:
            n = len(need)
            need[:] = wire[pos : pos + n]
            pos += n
            got = t.received(None)
        if got is not None:
            done.append(got)
    return done


def test_pack_request_compact_and_extended() -> None:
    assert pack_request(Cmd.READ, 0, 7, 4096, 512, extended=False) == struct.pack(
        ">IHHQQI", REQUEST_MAGIC, 0, 0, 7, 4096, 512
    )
    assert pack_request(Cmd.WRITE, 1, 7, 0, 1 << 33, extended=True) == struct.pack(
        ">IHHQQQ", EXTENDED_REQUEST_MAGIC, 1 | 32, 1, 7, 0, 1 << 33
    )
    with pytest.raises(ValueError):
        pack_request(Cmd.WRITE_ZEROES, 0, 1, 0, 1 << 32, extended=False)


@pytest.mark.parametrize("extended", [False, True])
def test_read_chunks_in_any_order(extended: bool) -> None:
    t = tx(extended)
    buf = bytearray(b"?" * 16)
    req, header = t.request(Cmd.READ, 100, 12, buffer=memoryview(buf)[2:14])
    assert len(header) == (32 if extended else 28)
    wire = chunk(t, req, 0, ReplyType.OFFSET_DATA, struct.pack(">Q", 108) + b"WXYZ")
    wire += chunk(t, req, 0, ReplyType.OFFSET_HOLE, struct.pack(">QI", 104, 4))
    wire += chunk(
        t,
        req,
        REPLY_FLAG_DONE,
        ReplyType.OFFSET_DATA,
        struct.pack(">Q", 100) + b"abcd",
    )
    assert feed(t, wire) == [req]
    assert buf == b"??abcd\0\0\0\0WXYZ??"
    assert req.done and req.error is None and not t.in_flight


def test_simple_replies_without_structured() -> None:
    t = tx(structured=False)
    buf = bytearray(4)
    r1, _ = t.request(Cmd.READ, 0, 4, buffer=memoryview(buf))
    r2, _ = t.request(Cmd.WRITE, 0, 4)
    wire = struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, 5, r2.cookie)
    wire += struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, 0, r1.cookie) + b"data"
    assert feed(t, wire) == [r2, r1]
    assert buf == b"data"
    assert r2.error is not None and r2.error.errno == 5


def test_block_status_chunks() -> None:
    t = tx()
    req, _ = t.request(Cmd.BLOCK_STATUS, 0, 1 << 20)
    wire = chunk(
        t,
        req,
        0,
        ReplyType.BLOCK_STATUS,
        struct.pack(">IIIII", CTX_DEPTH, 4096, 1, 8192, 0),
    )
    wire += chunk(
        t,
        req,
        REPLY_FLAG_DONE,
        ReplyType.BLOCK_STATUS,
        struct.pack(">III", CTX_BASE, 1 << 21, 3),
    )
    feed(t, wire)
    assert req.statuses == {CTX_DEPTH: [(4096, 1), (8192, 0)], CTX_BASE: [(1 << 21, 3)]}


def test_block_status_ext_chunks() -> None:
    t = tx(extended=True)
    req, _ = t.request(Cmd.BLOCK_STATUS, 0, 1 << 40)
    wire = chunk(
        t,
        req,
        0,
        ReplyType.BLOCK_STATUS_EXT,
        struct.pack(">IIQQ", CTX_DEPTH, 1, 1 << 40, 1),
    )
    wire += chunk(
        t,
        req,
        REPLY_FLAG_DONE,
        ReplyType.BLOCK_STATUS_EXT,
        struct.pack(">IIQQ", CTX_BASE, 1, 1 << 36, 2),
    )
    feed(t, wire)
    assert req.statuses == {CTX_DEPTH: [(1 << 40, 1)], CTX_BASE: [(1 << 36, 2)]}


READ_LEN = 4096


def _bad_read_wires(t: Transmission, req: Request) -> dict[str, bytes]:
    D = REPLY_FLAG_DONE
    data = ReplyType.OFFSET_DATA
    hole = ReplyType.OFFSET_HOLE
    off = req.offset
    return {
        "before": chunk(t, req, D, data, struct.pack(">Q", off - 1) + bytes(READ_LEN)),
        "after": chunk(
            t, req, D, data, struct.pack(">Q", off + 1) + bytes(READ_LEN - 1)
        ),
        "too long": chunk(
            t, req, D, data, struct.pack(">Q", off) + bytes(READ_LEN + 1)
        ),
        "empty data": chunk(t, req, D, data, struct.pack(">Q", off)),
        "zero hole": chunk(t, req, D, hole, struct.pack(">QI", off, 0)),
        "hole size": chunk(t, req, D, hole, struct.pack(">QIB", off, 1, 0)),
        "overlap": chunk(t, req, 0, hole, struct.pack(">QI", off, 2048))
        + chunk(t, req, D, data, struct.pack(">Q", off + 2047) + bytes(2049)),
        "short": chunk(t, req, D, data, struct.pack(">Q", off) + bytes(100)),
        "unknown type": chunk(t, req, D, 3, b""),
        "status for read": chunk(
            t, req, D, ReplyType.BLOCK_STATUS, struct.pack(">III", CTX_BASE, 1, 0)
        ),
        "none not done": chunk(t, req, 0, 0, b""),
        "none payload": chunk(t, req, D, 0, b"x"),
        "error len": chunk(
            t, req, D, ReplyType.ERROR, struct.pack(">IH", 5, 10) + b"abc"
        ),
        "error zero": chunk(t, req, D, ReplyType.ERROR, struct.pack(">IH", 0, 0)),
        "error offset outside": chunk(
            t,
            req,
            D,
            ReplyType.ERROR_OFFSET,
            struct.pack(">IHQ", 5, 0, off + READ_LEN),
        ),
        "cookie": chunk(
            t, Request(req.cookie + 9, 0, req.offset, READ_LEN), D, 0, b""
        ),
        "simple read": struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, 0, req.cookie)
        + bytes(16),
        "magic": struct.pack(">IIQQ", 0x12345678, 0, req.cookie, 0) + bytes(8),
        "huge": (
            struct.pack(
                ">IHHQQQ", EXTENDED_REPLY_MAGIC, D, 1, req.cookie, off, 1 << 62
            )
            if t.extended
            else struct.pack(
                ">IHHQI", STRUCTURED_REPLY_MAGIC, D, 1, req.cookie, 1 << 31
            )
        ),
    }


BAD_READS = sorted(_bad_read_wires(tx(), Request(1, 0, 65536, READ_LEN)))


@pytest.mark.parametrize("extended", [False, True])
@pytest.mark.parametrize("case", BAD_READS)
def test_bad_read_reply_is_protocol_error(extended: bool, case: str) -> None:
    t = tx(extended)
    whole = bytearray(b"#" * (READ_LEN + 64))
    req, _ = t.request(Cmd.READ, 65536, READ_LEN, buffer=memoryview(whole)[32:-32])
    wire = _bad_read_wires(t, req)[case]
    with pytest.raises(ProtocolError):
        feed(t, wire)
    assert whole[:32] == whole[-32:] == b"#" * 32
    assert t.broken is not None
    with pytest.raises(ProtocolError):
        t.request(Cmd.FLUSH, 0, 0)


@pytest.mark.parametrize(
    ("kind", "payload", "errno_", "message"),
    [
        (ReplyType.ERROR, struct.pack(">IH", 5, 3) + b"bad", 5, "bad"),
        (
            ReplyType.ERROR_OFFSET,
            struct.pack(">IH", 28, 0) + struct.pack(">Q", 65537),
            28,
            "",
        ),
        (0x8000 | 77, struct.pack(">IH", 1, 1) + b"x" + b"extra", 1, "x"),
        (0x8000 | 78, b"", 22, ""),
    ],
)
def test_error_chunks_fail_the_request(
    kind: int, payload: bytes, errno_: int, message: str
) -> None:
    t = tx()
    buf = bytearray(READ_LEN)
    req, _ = t.request(Cmd.READ, 65536, READ_LEN, buffer=memoryview(buf))
    wire = chunk(
        t, req, 0, ReplyType.OFFSET_DATA, struct.pack(">Q", 65536) + b"d" * READ_LEN
    )
    wire += chunk(t, req, REPLY_FLAG_DONE, kind, payload)
    assert feed(t, wire) == [req]
    assert req.error is not None
    assert (req.error.errno, req.error.message) == (errno_, message)
    assert t.broken is None


@pytest.mark.parametrize(
    "payload",
    [
        struct.pack(">I", CTX_BASE),  # no descriptor
        struct.pack(">IIIB", CTX_BASE, 1, 0, 0),  # partial descriptor
        struct.pack(">III", 99, 4096, 0),  # unknown context
        struct.pack(">III", CTX_BASE, 0, 0),  # zero length
    ],
)
def test_bad_block_status(payload: bytes) -> None:
    t = tx()
    req, _ = t.request(Cmd.BLOCK_STATUS, 0, 4096)
    with pytest.raises(ProtocolError):
        feed(t, chunk(t, req, REPLY_FLAG_DONE, ReplyType.BLOCK_STATUS, payload))


def test_block_status_duplicate_or_missing_context() -> None:
    t = tx()
    req, _ = t.request(Cmd.BLOCK_STATUS, 0, 4096)
    one = struct.pack(">III", CTX_BASE, 4096, 0)
    with pytest.raises(ProtocolError, match="two"):
        feed(t, chunk(t, req, 0, ReplyType.BLOCK_STATUS, one) * 2)
    t = tx()
    req, _ = t.request(Cmd.BLOCK_STATUS, 0, 4096)
    with pytest.raises(ProtocolError, match="lacks"):
        feed(t, chunk(t, req, REPLY_FLAG_DONE, ReplyType.BLOCK_STATUS, one))


# --- extents ------------------------------------------------------------------------


def test_walk_stops_at_shortest_and_limit() -> None:
    a = [(10, 1), (10, 2)]
    b = [(5, 7), (100, 8)]
    assert list(ext.walk(0, [a, b], 1000)) == [
        (0, 5, (1, 7)),
        (5, 5, (1, 8)),
        (10, 10, (2, 8)),
    ]
    assert list(ext.walk(0, [a, b], 7)) == [(0, 5, (1, 7)), (5, 2, (1, 8))]


@pytest.mark.parametrize(
    ("alloc", "depth", "limit", "expected", "end"),
    [
        ([(4096, 0), (4096, 0)], None, 8192, [Extent(0, 8192, False)], 8192),
        (
            [(4096, 3), (4096, 0)],
            None,
            10000,
            [Extent(0, 4096, True), Extent(4096, 4096, False)],
            8192,
        ),
        (
            [(8192, 3)],
            [(4096, 0), (4096, 2)],
            8192,
            [Extent(0, 4096, True, True), Extent(4096, 4096, True)],
            8192,
        ),
        ([(1 << 40, 3)], [(1 << 40, 0)], 5000, [Extent(0, 5000, True, True)], 5000),
        (
            [(1, 0), (1, 2), (1, 0xFF00)],
            None,
            3,
            [Extent(0, 1, False), Extent(1, 1, True), Extent(2, 1, False)],
            3,
        ),
    ],
)
def test_zero_extents(alloc, depth, limit, expected, end) -> None:  # type: ignore[no-untyped-def]
    out: list[Extent] = []
    assert ext.zero_extents(0, limit, alloc, depth, out) == end
    assert out == expected


def test_dirty_extents_merge_across_calls() -> None:
    out: list[Extent] = []
    assert ext.dirty_extents(0, 100, [(50, 1)], [(60, 0)], out) == 50
    assert ext.dirty_extents(50, 100, [(50, 1)], [(50, 2)], out) == 100
    assert out == [Extent(0, 50, False, dirty=True), Extent(50, 50, True, dirty=True)]
