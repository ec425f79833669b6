"""Reads spliced into a pipe and writes spliced from one: the data never
enters this process. Real servers for what works, the scripted server for
a server that fragments a read it was asked not to."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from diskferry.nbd import Client, ProtocolError, RequestError
from diskferry.pipe import Pipe

from .fake_server import CMD_READ, DEFAULT_FLAGS, Conn, FakeServer, Req
from .procs import Servers

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
        data += os.read(pipe.r, count - len(data))
    return data


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


@pytest.mark.parametrize("kind", ["qemu-nbd", "nbdkit"])
def test_read_and_write_through_a_pipe(servers: Servers, image: Path,
                                       pipe: Pipe, kind: str) -> None:
    if kind == "qemu-nbd":
        srv = servers.qemu_nbd(image, "raw", "--shared=8")
    else:
        srv = servers.nbdkit("file", str(image))
    expected = image.read_bytes()
    with Client(srv.address) as c:
        assert c.can_splice
        for offset in (0, MiB - 4096, 3 * MiB, 7 * MiB):
            c.readinto_pipe(pipe.w, offset, MiB)
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
            c.readinto_pipe(pipe.w, 0, MiB)
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
        c.readinto_pipe(pipe.w, MiB, MiB)
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
            c.readinto_pipe(pipe.w, 0, MiB)
        with pytest.raises(ProtocolError):
            c.flush()  # unusable after a protocol error


def test_no_splice_without_df(fake: Callable[..., FakeServer], pipe: Pipe) -> None:
    srv = fake(flags=DEFAULT_FLAGS & ~SEND_DF)
    with Client(srv.path) as c:
        assert not c.can_splice
        with pytest.raises(ValueError, match="unfragmented"):
            c.readinto_pipe(pipe.w, 0, 4096)
