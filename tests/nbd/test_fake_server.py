"""The client against a scripted server: misbehaviour, both header styles.

Every hostile reply must end in a clean exception (never a hang, never a
huge allocation), and the caller's memory outside the range it asked for
must stay untouched: buffers are slices of a larger array with canaries.
"""

from __future__ import annotations

import errno
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from diskferry.extent import Extent
from diskferry.nbd import (
    BlockSizeRequired,
    Client,
    ConnectionClosed,
    ConnectionTimeout,
    ExportUnknown,
    OptionError,
    ProtocolError,
    RequestError,
    ServerShutdown,
    TlsRequired,
)

from .fake_server import (
    CMD_BLOCK_STATUS,
    CMD_DISC,
    CMD_FLUSH,
    CMD_READ,
    CMD_TRIM,
    CMD_WRITE,
    CMD_WRITE_ZEROES,
    DEFAULT_FLAGS,
    DONE,
    OPT_EXPORT_NAME,
    OPT_EXTENDED,
    OPT_GO,
    OPT_STRUCTURED,
    T_ERROR_OFFSET,
    Conn,
    FakeServer,
    Req,
)

MiB = 1 << 20
CANARY = 0xA5

MakeServer = Callable[..., FakeServer]


@pytest.fixture(params=["compact", "extended"])
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def connect(srv: FakeServer, mode: str, **kwargs: Any) -> Client:
    kwargs.setdefault("timeout", 5.0)
    c = Client(srv.path, extended_headers=mode == "extended", **kwargs)
    assert c.extended_headers == (mode == "extended")
    return c


def guarded(size: int) -> tuple[bytearray, memoryview]:
    """A buffer of ``size`` with 64 canary bytes on each side."""
    whole = bytearray([CANARY]) * (size + 128)
    return whole, memoryview(whole)[64 : 64 + size]


def canaries_intact(whole: bytearray) -> bool:
    return whole[:64] == bytes([CANARY]) * 64 and whole[-64:] == bytes([CANARY]) * 64


# --- a well-behaved server, both modes ----------------------------------------------


def test_every_command(fake: MakeServer, mode: str) -> None:
    srv = fake(size=8 * MiB)
    with connect(srv, mode, request_size=MiB, write_request_size=MiB,
                 queue_depth=3) as c:
        c.write(b"a" * (3 * MiB + 100), 1000, fua=True)
        c.zero(2 * MiB, 4096, punch_hole=False)
        c.zero(2 * MiB + 4096, 4096, punch_hole=True, fast=True)
        c.trim(5 * MiB, 4096)
        c.flush()
        whole, view = guarded(8 * MiB)
        c.readinto(view, 0)
        assert canaries_intact(whole)
    expected = bytearray(8 * MiB)
    expected[1000 : 1000 + 3 * MiB + 100] = b"a" * (3 * MiB + 100)
    expected[2 * MiB : 2 * MiB + 8192] = bytes(8192)
    assert view == expected == srv.mem
    kinds = [(r.type, r.flags & ~32, r.length) for r in srv.requests]
    writes = [k for k in kinds if k[0] == CMD_WRITE]
    assert [w[2] for w in writes] == [MiB, MiB, MiB, 100]
    assert all(w[1] == 1 for w in writes)  # FUA
    zeroes = [k for k in kinds if k[0] == CMD_WRITE_ZEROES]
    assert zeroes == [(CMD_WRITE_ZEROES, 2, 4096), (CMD_WRITE_ZEROES, 16, 4096)]
    assert (CMD_TRIM, 0, 4096) in kinds
    assert (CMD_FLUSH, 0, 0) in kinds
    if mode == "extended":
        assert all(r.flags & 32 for r in srv.requests if r.type == CMD_WRITE)


def test_out_of_order_fragmented_replies(fake: MakeServer, mode: str) -> None:
    """Replies in reverse order, each read answered with several data and
    hole chunks in any order."""
    held: list[Req] = []

    def handler(conn: Conn, req: Req) -> bool:
        if req.type != CMD_READ:
            return False
        held.append(req)
        if len(held) < 4:
            return True
        for r in reversed(held):
            q = r.length // 4
            conn.data(
                r,
                r.offset + 3 * q,
                bytes(srv.mem[r.offset + 3 * q : r.offset + 4 * q]),
                done=False,
            )
            conn.hole(r, r.offset + q, q, done=False)
            conn.data(r, r.offset, bytes(srv.mem[r.offset : r.offset + q]), done=False)
            conn.data(
                r, r.offset + 2 * q, bytes(srv.mem[r.offset + 2 * q : r.offset + 3 * q])
            )
        held.clear()
        return True

    srv = fake(size=4 * MiB, handler=handler)
    srv.mem[:] = bytes(range(256)) * (4 * MiB // 256)
    with connect(srv, mode, request_size=MiB, queue_depth=4) as c:
        whole, view = guarded(4 * MiB)
        c.readinto(view, 0)
        expected = bytearray(srv.mem)
        for base in range(0, 4 * MiB, MiB):
            expected[base + MiB // 4 : base + MiB // 2] = bytes(MiB // 4)
        assert view == expected
        assert canaries_intact(whole)


def test_extents_loop_clip_merge(fake: MakeServer, mode: str) -> None:
    statuses = {
        "base:allocation": [(1000, 0), (3096, 0), (4096, 3), (8192, 2), (1 << 20, 0)],
        "qemu:allocation-depth": [(8192, 1), (4096, 0), (4096, 0), (1 << 20, 1)],
    }
    srv = fake(
        size=(1 << 20) + 16384,
        contexts=("base:allocation", "qemu:allocation-depth"),
        statuses=statuses,
        max_descriptors=2,
    )
    with connect(srv, mode) as c:
        assert c.has_allocation_depth
        assert c.extents() == [
            Extent(0, 4096, False),
            Extent(4096, 4096, True),
            Extent(8192, 8192, True, hole=True),
            Extent(16384, 1 << 20, False),
        ]
        assert c.extents(500, 4000) == [
            Extent(500, 3596, False),
            Extent(4096, 404, True),
        ]
    # The client loops from the first offset every context covers.
    assert len([r for r in srv.requests if r.type == CMD_BLOCK_STATUS]) > 3


def test_status_unknown_bits_and_unaligned(fake: MakeServer, mode: str) -> None:
    statuses = {"base:allocation": [(511, 0xF0), (1, 0xF2), (4096, 0xFFFF0002)]}
    srv = fake(size=4608, statuses=statuses, block_size=(512, 4096, MiB))
    with connect(srv, mode) as c:
        assert c.extents() == [Extent(0, 511, False), Extent(511, 4097, True)]


def test_no_base_allocation_is_one_data_extent(fake: MakeServer, mode: str) -> None:
    srv = fake(size=MiB, contexts=())
    with connect(srv, mode) as c:
        assert c.extents() == [Extent(0, MiB, False)]
    assert not [r for r in srv.requests if r.type == CMD_BLOCK_STATUS]


def test_dirty_bitmap_from_list(fake: MakeServer, mode: str) -> None:
    statuses = {
        "base:allocation": [(MiB, 0), (MiB, 2)],
        "qemu:dirty-bitmap:bm": [(4096, 1), (2 * MiB - 4096, 0)],
    }
    srv = fake(
        size=2 * MiB,
        contexts=("base:allocation", "qemu:dirty-bitmap:bm"),
        statuses=statuses,
    )
    with connect(srv, mode, dirty_bitmap=True) as c:
        assert c.dirty_bitmap == "bm"
        assert c.dirty_extents() == [
            Extent(0, 4096, False, dirty=True),
            Extent(4096, MiB - 4096, False),
            Extent(MiB, MiB, True),
        ]


def test_block_size_honoured(fake: MakeServer, mode: str) -> None:
    srv = fake(size=4 * MiB, block_size=(4096, 65536, 256 * 1024))
    with connect(srv, mode, request_size=MiB) as c:
        assert c.block_size == (4096, 65536, 256 * 1024)
        assert c.request_size == 256 * 1024
        whole, view = guarded(MiB)
        c.readinto(view, 4096)
        with pytest.raises(ValueError, match="aligned"):
            c.readinto(bytearray(4096), 100)
    reads = [r.length for r in srv.requests if r.type == CMD_READ]
    assert reads == [256 * 1024] * 4


def test_zero_emulated_without_write_zeroes(fake: MakeServer, mode: str) -> None:
    srv = fake(size=2 * MiB, flags=DEFAULT_FLAGS & ~64 & ~2048)
    srv.mem[:] = b"x" * (2 * MiB)
    with connect(srv, mode, request_size=512 * 1024) as c:
        assert not c.can_zero
        with pytest.raises(RequestError) as e:
            c.zero(0, 4096, punch_hole=True, fast=True)
        assert e.value.errno == errno.ENOTSUP
        c.zero(4096, MiB + 4096, punch_hole=True)
    assert srv.mem == b"x" * 4096 + bytes(MiB + 4096) + b"x" * (MiB - 8192)
    assert {r.type for r in srv.requests} - {CMD_DISC} == {CMD_WRITE}


def test_flush_noop_without_send_flush(fake: MakeServer, mode: str) -> None:
    srv = fake(flags=DEFAULT_FLAGS & ~4)
    with connect(srv, mode) as c:
        assert not c.can_flush
        c.write(b"q" * 512, 0, fua=False)
        c.flush()
    assert CMD_FLUSH not in [r.type for r in srv.requests]


def test_flush_waits_for_writes(fake: MakeServer, mode: str) -> None:
    order: list[str] = []
    delayed: list[Req] = []

    def handler(conn: Conn, req: Req) -> bool:
        if req.type == CMD_WRITE:
            delayed.append(req)
            if len(delayed) == 3:
                for r in delayed:
                    order.append("write-reply")
                    srv.answer(conn, r)
            return True
        if req.type == CMD_FLUSH:
            order.append("flush")
        return False

    srv = fake(handler=handler)
    with connect(srv, mode) as c:
        hs = [c.submit_write(b"w" * 4096, i * 4096) for i in range(3)]
        c.flush()
        for h in hs:
            c.wait(h)
    assert order == ["write-reply"] * 3 + ["flush"]


# --- hostile replies, both modes ------------------------------------------------------


def reply_with(action: Callable[[Conn, Req], None]) -> Callable[[Conn, Req], bool]:
    def handler(conn: Conn, req: Req) -> bool:
        if req.type == CMD_READ and req.offset == 65536:
            action(conn, req)
            return True
        return False

    return handler


HOSTILE: dict[str, tuple[Callable[[Conn, Req], None], type[Exception]]] = {
    "wrong magic": (
        lambda conn, req: conn.send(struct.pack(">IIQ", 0xDEADBEEF, 0, req.cookie)),
        ProtocolError,
    ),
    "data before the request": (
        lambda conn, req: conn.data(req, req.offset - 8, bytes(req.length)),
        ProtocolError,
    ),
    "data after the request": (
        lambda conn, req: conn.data(req, req.offset + 8, bytes(req.length - 8)),
        ProtocolError,
    ),
    "hole past the end": (
        lambda conn, req: conn.hole(req, req.offset + req.length - 512, 1024),
        ProtocolError,
    ),
    "overlapping chunks": (
        lambda conn, req: (
            conn.data(req, req.offset, bytes(1024), done=False),
            conn.hole(req, req.offset + 512, req.length - 512),
        ),
        ProtocolError,
    ),
    "data longer than the request": (
        lambda conn, req: conn.data(req, req.offset, bytes(req.length + 1)),
        ProtocolError,
    ),
    "huge chunk length": (
        lambda conn, req: conn.send(
            struct.pack(">IHHQQQ", 0x6E8A278C, 1, 5, req.cookie, req.offset, 1 << 60)
            if conn.extended
            else struct.pack(">IHHQI", 0x668E33EF, 1, 5, req.cookie, 0xFFFFFFFF)
        ),
        ProtocolError,
    ),
    "huge error message": (
        lambda conn, req: conn.chunk(
            req, DONE, 32769, struct.pack(">IH", 5, 60000) + bytes(60000)
        ),
        ProtocolError,
    ),
    "unknown chunk type": (
        lambda conn, req: conn.chunk(req, DONE, 77, b"x" * 8),
        ProtocolError,
    ),
    "unknown cookie": (
        lambda conn, req: conn.data(
            Req(0, 0, req.cookie + 1000, req.offset, req.length),
            req.offset,
            bytes(req.length),
        ),
        ProtocolError,
    ),
    "done without full coverage": (
        lambda conn, req: conn.data(req, req.offset, bytes(req.length // 2)),
        ProtocolError,
    ),
    "simple reply to a structured read": (
        lambda conn, req: conn.simple(req, 0, bytes(req.length)),
        ProtocolError,
    ),
    "none chunk without done": (
        lambda conn, req: conn.chunk(req, 0, 0),
        ProtocolError,
    ),
    "truncated data then close": (
        lambda conn, req: (
            conn.send(
                struct.pack(
                    ">IHHQQQ", 0x6E8A278C, 1, 1, req.cookie, req.offset, 8 + req.length
                )
                if conn.extended
                else struct.pack(">IHHQI", 0x668E33EF, 1, 1, req.cookie, 8 + req.length)
            ),
            conn.send(struct.pack(">Q", req.offset) + b"t" * 100),
            conn.close(),
        ),
        ConnectionClosed,
    ),
    "truncated header then close": (
        lambda conn, req: (conn.send(struct.pack(">I", 0x668E33EF)[:3]), conn.close()),
        ConnectionClosed,
    ),
    "close midway": (lambda conn, req: conn.close(), ConnectionClosed),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_reply(fake: MakeServer, mode: str, case: str) -> None:
    action, expected = HOSTILE[case]
    srv = fake(size=MiB, handler=reply_with(action))
    srv.mem[:] = b"m" * MiB
    c = connect(srv, mode, request_size=65536, queue_depth=4)
    whole, view = guarded(3 * 65536)
    start = time.monotonic()
    with pytest.raises(expected):
        c.readinto(view, 0)
    assert time.monotonic() - start < 3
    assert canaries_intact(whole)
    # The client is unusable now, and says so at once.
    with pytest.raises((ProtocolError, ConnectionClosed)):
        c.readinto(bytearray(512), 0)
    with pytest.raises((ProtocolError, ConnectionClosed)):
        c.write(b"x", 0)
    c.close()


FAILED_READS: dict[str, Callable[[Conn, Req], None]] = {
    "error after data": lambda conn, req: (
        conn.data(req, req.offset, bytes(req.length // 2), done=False),
        conn.error(req, 5, "bad sector"),
    ),
    "error then data": lambda conn, req: (
        conn.error(req, 5, "bad sector", done=False),
        conn.data(req, req.offset, bytes(req.length)),
    ),
    "error with offset": lambda conn, req: conn.error(
        req, 5, "bad sector", kind=T_ERROR_OFFSET, offset=req.offset + 512
    ),
    "unknown error type": lambda conn, req: conn.chunk(
        req, DONE, 0x8000 + 99, struct.pack(">IH", 5, 10) + b"bad sector"
    ),
}


@pytest.mark.parametrize("case", sorted(FAILED_READS))
def test_error_chunk_fails_request_connection_usable(
    fake: MakeServer, mode: str, case: str
) -> None:
    srv = fake(size=MiB, handler=reply_with(FAILED_READS[case]))
    srv.mem[:] = b"m" * MiB
    with connect(srv, mode, request_size=65536, queue_depth=4) as c:
        whole, view = guarded(4 * 65536)
        with pytest.raises(RequestError) as e:
            c.readinto(view, 0)
        assert e.value.errno == errno.EIO
        assert e.value.message == "bad sector"
        if case == "error with offset":
            assert e.value.offset == 65536 + 512
        assert canaries_intact(whole)
        # Still in sync: the next commands work.
        buf = bytearray(65536)
        c.readinto(buf, 2 * 65536)
        assert buf == b"m" * 65536
        c.write(b"w" * 512, 0)


def test_simple_error_reply_for_write(fake: MakeServer, mode: str) -> None:
    def handler(conn: Conn, req: Req) -> bool:
        if req.type == CMD_WRITE:
            if conn.extended:
                conn.error(req, 28, "no space")
            else:
                conn.simple(req, 28)
            return True
        return False

    srv = fake(handler=handler)
    with connect(srv, mode) as c:
        with pytest.raises(RequestError) as e:
            c.write(b"x" * 4096, 0)
        assert e.value.errno == errno.ENOSPC
        c.flush()


def test_unknown_errno_is_einval(fake: MakeServer, mode: str) -> None:
    srv = fake(handler=reply_with(lambda conn, req: conn.error(req, 4242, "odd")))
    with connect(srv, mode, request_size=65536) as c:
        with pytest.raises(RequestError) as e:
            c.readinto(bytearray(65536), 65536)
        assert e.value.errno == errno.EINVAL


def test_eshutdown_soft_disconnects(fake: MakeServer, mode: str) -> None:
    srv = fake(handler=reply_with(lambda conn, req: conn.error(req, 108, "bye")))
    c = connect(srv, mode, request_size=65536)
    with pytest.raises(RequestError):
        c.readinto(bytearray(65536), 65536)
    with pytest.raises(ConnectionClosed, match="shutting down"):
        c.readinto(bytearray(512), 0)
    c.close()


def test_silent_server_times_out(fake: MakeServer, mode: str) -> None:
    srv = fake(handler=lambda conn, req: True)
    c = connect(srv, mode, timeout=0.3)
    start = time.monotonic()
    with pytest.raises(ConnectionTimeout):
        c.readinto(bytearray(4096), 0)
    assert time.monotonic() - start < 2
    c.close()


def test_extended_reply_offset_must_match(fake: MakeServer) -> None:
    def handler(conn: Conn, req: Req) -> bool:
        req2 = Req(req.flags, req.type, req.cookie, req.offset + 1, req.length)
        conn.chunk(req2, DONE, 0)
        return True

    srv = fake(handler=handler)
    with connect(srv, "extended") as c:
        with pytest.raises(ProtocolError, match="offset"):
            c.flush()


def test_compact_status_chunk_in_extended_mode(fake: MakeServer) -> None:
    def handler(conn: Conn, req: Req) -> bool:
        if req.type == CMD_BLOCK_STATUS:
            conn.chunk(req, DONE, 5, struct.pack(">III", 100, req.length, 0))
            return True
        return False

    srv = fake(handler=handler)
    with connect(srv, "extended") as c:
        with pytest.raises(ProtocolError):
            c.extents()


def test_block_status_missing_context(fake: MakeServer, mode: str) -> None:
    def handler(conn: Conn, req: Req) -> bool:
        if req.type == CMD_BLOCK_STATUS:
            conn.status(req, 100, [(req.length, 0)], done=True)
            return True
        return False

    srv = fake(
        contexts=("base:allocation", "qemu:allocation-depth"),
        statuses={
            "base:allocation": [(4 * MiB, 0)],
            "qemu:allocation-depth": [(4 * MiB, 1)],
        },
        handler=handler,
    )
    with connect(srv, mode) as c:
        with pytest.raises(ProtocolError, match="lacks contexts"):
            c.extents()


# --- handshake ---------------------------------------------------------------


def test_extended_not_offered_falls_back(fake: MakeServer) -> None:
    srv = fake(extended=False)
    with Client(srv.path, extended_headers=True) as c:
        assert not c.extended_headers
        c.write(b"x" * 4096, 0)
    assert srv.options[:2] == [OPT_EXTENDED, OPT_STRUCTURED]


def test_structured_reply_not_requested_with_extended(fake: MakeServer) -> None:
    srv = fake()
    with Client(srv.path, extended_headers=True) as c:
        assert c.extended_headers
    assert OPT_STRUCTURED not in srv.options


@pytest.mark.parametrize("no_zeroes", [True, False])
def test_export_name_fallback(fake: MakeServer, no_zeroes: bool) -> None:
    srv = fake(go=False, no_zeroes=no_zeroes, size=MiB)
    srv.mem[:4] = b"abcd"
    with Client(srv.path, "name") as c:
        assert c.info.used_export_name
        assert c.size == MiB
        assert c.block_size == (1, 4096, 32 * MiB)
        buf = bytearray(4)
        c.readinto(buf, 0)
        assert buf == b"abcd"
        assert not c.has_base_allocation
        assert c.extents() == [Extent(0, MiB, False)]
    assert srv.options[-1] == OPT_EXPORT_NAME


def test_old_server_without_structured_replies(fake: MakeServer) -> None:
    srv = fake(structured=False, extended=False, size=MiB)
    srv.mem[:] = b"s" * MiB
    with Client(srv.path, extended_headers=True, request_size=65536) as c:
        assert not c.info.structured_replies
        whole, view = guarded(MiB)
        c.readinto(view, 0)
        assert view == b"s" * MiB and canaries_intact(whole)
        assert c.extents() == [Extent(0, MiB, False)]


@pytest.mark.parametrize(
    ("rep", "cls"),
    [
        (0x80000005, TlsRequired),
        (0x80000006, ExportUnknown),
        (0x80000007, ServerShutdown),
        (0x80000008, BlockSizeRequired),
        (0x80000063, OptionError),
    ],
)
def test_go_refused(fake: MakeServer, rep: int, cls: type[OptionError]) -> None:
    srv = fake(option_errors={OPT_GO: (rep, "go away")})
    with pytest.raises(cls) as e:
        Client(srv.path)
    assert e.value.message == "go away"
    assert e.value.reply == rep


def test_not_an_nbd_server(fake: MakeServer) -> None:
    srv = fake(greeting=b"HTTP/1.1 400 Bad Request\r\n")
    with pytest.raises(ProtocolError, match="not an NBD server"):
        Client(srv.path)


def test_silent_server_connect_timeout(tmp_path: Path) -> None:
    import socket

    path = str(tmp_path / "silent.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(1)
    try:
        start = time.monotonic()
        with pytest.raises(ConnectionTimeout):
            Client(path, connect_timeout=0.3)
        assert time.monotonic() - start < 2
    finally:
        listener.close()


def test_mixed_pipelined_reads_and_writes_do_not_deadlock(
    fake: MakeServer, mode: str
) -> None:
    """Big writes while big read replies wait: the client must read replies
    while its send is blocked, or both sides would wait forever."""
    srv = fake(size=64 * MiB)
    with connect(srv, mode, timeout=10.0) as c:
        bufs = [bytearray(4 * MiB) for _ in range(8)]
        reads = [c.submit_read(b, i * 4 * MiB) for i, b in enumerate(bufs)]
        writes = [
            c.submit_write(b"w" * 4 * MiB, 32 * MiB + i * 4 * MiB) for i in range(8)
        ]
        done = threading.Event()
        for h in reads + writes:
            c.wait(h)
        done.set()
    assert srv.mem[32 * MiB :] == b"w" * 32 * MiB
