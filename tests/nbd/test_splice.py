"""Reads spliced into a pipe and writes spliced from one: the data never
enters this process. Real servers for what works, the scripted server for
a server that fragments a read it was asked not to."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from diskferry.nbd import Client, ConnectionClosed, ProtocolError, RequestError
from diskferry.pipe import Pipe

from .fake_server import CMD_READ, DEFAULT_FLAGS, Conn, FakeServer, Req
from .procs import Export, Servers

SEND_DF = 1 << 7

MiB = 1 << 20


@pytest.fixture
def pipe() -> Iterator[Pipe]:
    p = Pipe()
    yield p
    p.close()


def drain(pipe: Pipe, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = os.read(pipe.r, count - len(data))
        if not chunk:
            raise EOFError(f"pipe ended {count - len(data)} bytes early")
        data += chunk
    return data


def read(c: Client, pipe: Pipe, offset: int, count: int) -> None:
    """Splice ``count`` bytes into one pipe: one piece, the pipe holds it."""
    assert count <= c.pipe_piece(pipe.size)
    c.readinto_pipes([pipe.w], offset, count, c.pipe_piece(pipe.size),
                     lambda block: True)


def stream(c: Client, pipes: list[Pipe], offset: int, length: int) -> bytes:
    """Splice a range into ``pipes`` in turn while a thread drains them
    as the daemon's request thread does; return what it drained."""
    piece = c.pipe_piece(min(p.size for p in pipes))
    drained = threading.Semaphore(0)
    out = bytearray()

    def drain_all() -> None:
        for i, pos in enumerate(range(offset, offset + length, piece)):
            out.extend(drain(pipes[i % len(pipes)],
                             min(piece, offset + length - pos)))
            drained.release()

    def guarded() -> None:
        with contextlib.suppress(EOFError):
            drain_all()

    t = threading.Thread(target=guarded)
    t.start()
    try:
        c.readinto_pipes([p.w for p in pipes], offset, length, piece,
                         lambda block: drained.acquire(blocking=block))
    finally:
        for p in pipes:  # as the daemon's worker does: the drainer ends
            p.close_write()
        t.join(10)
        assert not t.is_alive()
    return bytes(out)


@pytest.fixture
def pipes() -> Iterator[list[Pipe]]:
    ps = [Pipe() for _ in range(4)]
    yield ps
    for p in ps:
        p.close()


def fill(pipe: Pipe, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(pipe.w, view):]


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.raw"
    data = bytearray(os.urandom(4 * MiB))
    data[MiB:2 * MiB] = bytes(MiB)
    path.write_bytes(data)
    with open(path, "r+b") as f:  # a hole in the middle
        f.truncate(8 * MiB)
    return path


def serve(servers: Servers, image: Path, kind: str) -> Export:
    """``image`` exported by a real server of ``kind``."""
    if kind == "qemu-nbd":
        return servers.qemu_nbd(image, "raw", "--shared=8")
    return servers.nbdkit("file", str(image))


@pytest.mark.parametrize("kind", ["qemu-nbd", "nbdkit"])
def test_read_and_write_through_a_pipe(servers: Servers, image: Path,
                                       pipe: Pipe, kind: str) -> None:
    srv = serve(servers, image, kind)
    expected = image.read_bytes()
    with Client(srv.address) as c:
        assert c.can_splice
        for offset in (0, MiB - 4096, 3 * MiB, 7 * MiB):
            read(c, pipe, offset, MiB)
            assert drain(pipe, MiB) == expected[offset:offset + MiB]
        data = os.urandom(MiB)
        fill(pipe, data)
        c.write_from_pipe(pipe.r, 5 * MiB + 512, MiB)
        c.flush()
        buf = bytearray(MiB)
        c.readinto(buf, 5 * MiB + 512)
        assert buf == data
    with open(image, "rb") as f:
        f.seek(5 * MiB + 512)
        assert f.read(MiB) == data


def test_read_error_through_a_pipe(servers: Servers, image: Path,
                                   pipe: Pipe, tmp_path: Path) -> None:
    srv = servers.nbdkit("file", str(image), "error-pread-rate=1",
                         filters=("error",))
    with Client(srv.address) as c:
        with pytest.raises(RequestError):
            read(c, pipe, 0, MiB)
        c.flush()  # the connection is still usable


def test_write_to_read_only_export_fails(servers: Servers, image: Path,
                                         pipe: Pipe) -> None:
    srv = servers.qemu_nbd(image, "raw", "--read-only")
    with Client(srv.address) as c:
        with pytest.raises(RequestError):
            c.write_from_pipe(pipe.r, 0, 4096)


@pytest.mark.parametrize("extended", [False, True])
def test_in_order_chunks_and_holes_reach_the_pipe(
        fake: Callable[..., FakeServer], pipe: Pipe, extended: bool) -> None:
    def handler(conn: Conn, req: Req) -> bool:
        if req.type != CMD_READ:
            return False
        half = req.length // 2
        conn.data(req, req.offset, bytes(srv.mem[req.offset:req.offset + half]),
                  done=False)
        conn.hole(req, req.offset + half, req.length - half)
        return True

    srv = fake(handler=handler)
    srv.mem[:] = os.urandom(len(srv.mem))
    with Client(srv.path, extended_headers=extended) as c:
        read(c, pipe, MiB, MiB)
        got = drain(pipe, MiB)
    assert got == bytes(srv.mem[MiB:MiB + MiB // 2]) + bytes(MiB // 2)


@pytest.mark.parametrize("extended", [False, True])
def test_fragmented_read_out_of_order_is_a_protocol_error(
        fake: Callable[..., FakeServer], pipe: Pipe, extended: bool) -> None:
    def handler(conn: Conn, req: Req) -> bool:
        if req.type != CMD_READ:
            return False
        half = req.length // 2
        conn.data(req, req.offset + half, bytes(half), done=False)
        conn.data(req, req.offset, bytes(half))
        return True

    srv = fake(handler=handler)
    with Client(srv.path, extended_headers=extended) as c:
        with pytest.raises(ProtocolError, match="out of order"):
            read(c, pipe, 0, MiB)
        with pytest.raises(ProtocolError):
            c.flush()  # unusable after a protocol error


def test_no_splice_without_df(fake: Callable[..., FakeServer], pipe: Pipe) -> None:
    srv = fake(flags=DEFAULT_FLAGS & ~SEND_DF)
    with Client(srv.path) as c:
        assert not c.can_splice
        with pytest.raises(ValueError, match="unfragmented"):
            read(c, pipe, 0, 4096)


@pytest.mark.parametrize("kind", ["qemu-nbd", "nbdkit"])
def test_reads_in_flight_reach_their_pipes_in_order(
        servers: Servers, image: Path, pipes: list[Pipe], kind: str) -> None:
    """Many pieces, several in flight, a range that starts and ends inside
    a piece, across data, zeros and the hole of a real export."""
    srv = serve(servers, image, kind)
    expected = image.read_bytes()
    with Client(srv.address) as c:
        got = stream(c, pipes, 4096, 8 * MiB - 8192)
        assert got == expected[4096:8 * MiB - 4096]
        c.flush()  # still in step with the server


def reversed_pairs(srv: FakeServer, hole_in_second: bool):
    """A handler answering READs two at a time, the later one first (its
    second half as a hole chunk, if asked): replies overtake each other."""
    held: list[Req] = []

    def handler(conn: Conn, req: Req) -> bool:
        if req.type != CMD_READ:
            return False
        if not held:
            held.append(req)
            return True
        first = held.pop()
        if hole_in_second:
            half = req.length // 2
            conn.data(req, req.offset,
                      bytes(srv.mem[req.offset:req.offset + half]), done=False)
            conn.hole(req, req.offset + half, req.length - half)
        else:
            srv.answer(conn, req)
        srv.answer(conn, first)
        return True

    return handler


@pytest.mark.parametrize("hole_in_second", [False, True])
def test_replies_out_of_order_reach_their_pipes(
        fake: Callable[..., FakeServer], pipes: list[Pipe],
        hole_in_second: bool) -> None:
    srv = fake(size=16 * MiB)
    srv.handler = reversed_pairs(srv, hole_in_second)
    srv.mem[:] = os.urandom(len(srv.mem))
    with Client(srv.path) as c:
        piece = c.pipe_piece(pipes[0].size)
        count = 8  # an even number of pieces: every one has a partner
        got = stream(c, pipes, 0, count * piece)
    expected = bytearray(srv.mem[:count * piece])
    if hole_in_second:
        for i in range(1, count, 2):
            expected[i * piece + piece // 2:(i + 1) * piece] = bytes(piece // 2)
    assert got == expected


def test_a_failed_piece_fails_the_read_after_the_others(
        fake: Callable[..., FakeServer], pipes: list[Pipe]) -> None:
    def handler(conn: Conn, req: Req) -> bool:
        if req.type == CMD_READ and req.offset == 2 * MiB:
            conn.error(req, 5, "bad sector")
            return True
        return False

    srv = fake(handler=handler)
    with Client(srv.path) as c:
        with pytest.raises(RequestError, match="bad sector"):
            stream(c, pipes, 0, 4 * MiB)
        reads = [r for r in srv.requests if r.type == CMD_READ]
        assert len(reads) == 4  # all four were in flight at once
        c.flush()  # every reply was read: the connection is usable


def test_a_piece_that_does_not_fit_the_export_is_refused(
        fake: Callable[..., FakeServer], pipes: list[Pipe]) -> None:
    srv = fake()
    with Client(srv.path) as c:
        with pytest.raises(ValueError, match="do not fit"):
            c.readinto_pipes([pipes[0].w], 0, MiB, 64 * MiB,  # > max payload
                             lambda block: True)


def test_abandoned_reads_in_flight_break_the_connection(
        fake: Callable[..., FakeServer], pipes: list[Pipe]) -> None:
    """The drainer stopped (``reclaim`` raised) with reads in flight: their
    replies would go to pipes that are closed, so nothing more is sent."""
    srv = fake(size=16 * MiB)

    def reclaim(block: bool) -> bool:
        raise RuntimeError("the drainer stopped")

    with Client(srv.path) as c:
        piece = c.pipe_piece(pipes[0].size)
        with pytest.raises(RuntimeError, match="drainer"):
            c.readinto_pipes([p.w for p in pipes], 0, 8 * piece, piece,
                             reclaim)
        with pytest.raises(ConnectionClosed, match="unusable"):
            c.flush()
