"""The client against real qemu-nbd: raw and qcow2, UNIX and TCP."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from diskferry.extent import Extent
from diskferry.nbd import (
    ANY_BITMAP,
    Client,
    ConnectionClosed,
    ContextNotNegotiated,
    DirtyBitmapError,
    ExportUnknown,
    NbdError,
    ProtocolError,
    RequestError,
    open_client,
)

from .procs import Servers, qemu_img, qemu_io

MiB = 1024 * 1024


def raw_image(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def pattern(size: int, seed: int = 0) -> bytes:
    block = bytes((seed + i) % 251 for i in range(4096))
    return (block * (size // 4096 + 1))[:size]


def test_handshake_properties(servers: Servers, tmp_path: Path) -> None:
    img = raw_image(tmp_path / "disk.raw", 64 * MiB)
    srv = servers.qemu_nbd(img, "raw", "--shared=8")
    with Client(srv.sock) as c:
        assert c.size == 64 * MiB
        assert not c.read_only
        assert c.can_flush and c.can_fua and c.can_trim
        assert c.can_zero and c.can_fast_zero
        assert c.can_multi_conn
        assert c.block_size == (1, 4096, 32 * MiB)
        assert c.max_payload == 32 * MiB
        assert not c.extended_headers
        assert c.dirty_bitmap is None
        assert not c.has_allocation_depth


def test_multi_conn_only_when_shared(servers: Servers, tmp_path: Path) -> None:
    img = raw_image(tmp_path / "disk.raw", MiB)
    srv = servers.qemu_nbd(img, "raw", "--shared=1")
    with Client(srv.sock) as c:
        assert not c.can_multi_conn


def test_read_only_export(servers: Servers, tmp_path: Path) -> None:
    img = tmp_path / "disk.raw"
    img.write_bytes(pattern(4 * MiB))
    srv = servers.qemu_nbd(img, "raw", "--read-only", "--shared=8")
    with Client(srv.sock) as c:
        assert c.read_only and not c.can_zero and not c.can_trim
        assert c.can_multi_conn
        with pytest.raises(RequestError) as e:
            c.write(b"x" * 4096, 0)
        assert e.value.errno == errno.EPERM
        buf = bytearray(4 * MiB)
        c.readinto(buf, 0)
        assert buf == pattern(4 * MiB)


def test_every_command_roundtrip(servers: Servers, tmp_path: Path) -> None:
    img = raw_image(tmp_path / "disk.raw", 16 * MiB)
    srv = servers.qemu_nbd(img, "raw", "--shared=8", "--discard=unmap")
    data = pattern(6 * MiB, 7)
    with Client(srv.sock, request_size=MiB, queue_depth=4) as c:
        c.write(data, MiB)
        c.write(b"F" * 4096, 10 * MiB, fua=True)
        c.zero(2 * MiB, MiB, punch_hole=False)
        c.zero(3 * MiB, MiB, punch_hole=True)
        c.zero(4 * MiB, MiB, punch_hole=True, fast=True)
        c.trim(12 * MiB, MiB)
        c.flush()
        buf = bytearray(16 * MiB)
        c.readinto(buf, 0)
    expected = bytearray(16 * MiB)
    expected[MiB : 7 * MiB] = data
    expected[2 * MiB : 5 * MiB] = bytes(3 * MiB)
    expected[10 * MiB : 10 * MiB + 4096] = b"F" * 4096
    assert buf == expected
    assert img.read_bytes() == expected


def test_unaligned_ranges_and_odd_sizes(servers: Servers, tmp_path: Path) -> None:
    img = raw_image(tmp_path / "disk.raw", 3 * MiB + 512)
    srv = servers.qemu_nbd(img, "raw")
    with Client(srv.sock, request_size=65536) as c:
        assert c.size == 3 * MiB + 512
        c.write(b"abc" * 1000, 12345)
        buf = bytearray(3001)
        c.readinto(buf, 12344)
        assert buf == b"\0" + b"abc" * 1000
        c.write(b"E" * 512, 3 * MiB)
        with pytest.raises(ValueError):
            c.readinto(bytearray(2), c.size - 1)
        ext = c.extents()
        assert ext[-1].end == c.size
        assert sum(e.length for e in ext) == c.size


def test_request_larger_than_server_maximum_is_split(
    servers: Servers, tmp_path: Path
) -> None:
    img = tmp_path / "disk.raw"
    img.write_bytes(pattern(40 * MiB, 3))
    srv = servers.qemu_nbd(img, "raw")
    # qemu-nbd refuses reads above 32 MiB with EINVAL: the client must cap.
    with Client(srv.sock, request_size=64 * MiB, queue_depth=2) as c:
        assert c.request_size == 32 * MiB
        buf = bytearray(40 * MiB)
        c.readinto(buf, 0)
        assert buf == pattern(40 * MiB, 3)
        # The lower-level API refuses what the server would refuse.
        with pytest.raises(ValueError):
            c.submit_read(bytearray(33 * MiB), 0)


def test_server_error_keeps_connection(servers: Servers, tmp_path: Path) -> None:
    img = raw_image(tmp_path / "disk.raw", 64 * MiB)
    srv = servers.qemu_nbd(img, "raw")
    with Client(srv.sock) as c:
        # Bypass the client's own checks: ask qemu for a too-large read.
        big = bytearray(33 * MiB)
        h = c._submit(0, 0, len(big), buffer=memoryview(big))
        with pytest.raises(RequestError) as e:
            c.wait(h)
        assert e.value.errno == errno.EINVAL
        assert "larger than max len" in e.value.message
        c.write(b"ok" * 2048, 0)
        buf = bytearray(4096)
        c.readinto(buf, 0)
        assert buf == b"ok" * 2048


def test_submit_and_wait_out_of_order(servers: Servers, tmp_path: Path) -> None:
    img = tmp_path / "disk.raw"
    img.write_bytes(pattern(8 * MiB, 1))
    srv = servers.qemu_nbd(img, "raw", "--shared=8")
    with Client(srv.sock) as c:
        bufs = [bytearray(MiB) for _ in range(8)]
        handles = [c.submit_read(b, i * MiB) for i, b in enumerate(bufs)]
        for h in reversed(handles):
            c.wait(h)
        assert b"".join(bufs) == pattern(8 * MiB, 1)
        w = [c.submit_write(b"W" * MiB, i * MiB) for i in range(4)]
        c.flush()  # waits for the writes before sending FLUSH
        assert all(h.done and h.error is None for h in w)
        c.wait(w[0])
    assert img.read_bytes()[: 4 * MiB] == b"W" * 4 * MiB


def test_tcp_and_url_forms(servers: Servers, tmp_path: Path) -> None:
    img = tmp_path / "disk.raw"
    img.write_bytes(pattern(MiB, 5))
    srv = servers.qemu_nbd(img, "raw", "--export-name=disk one", "--shared=4", tcp=True)
    host, port = srv.address
    for url in (
        f"nbd://{host}:{port}/disk%20one",
        f"nbd:{host}:{port}:exportname=disk one",
    ):
        with open_client(url) as c:
            buf = bytearray(MiB)
            c.readinto(buf, 0)
            assert buf == pattern(MiB, 5)
    with pytest.raises(ExportUnknown) as e:
        open_client(f"nbd://{host}:{port}/nope")
    assert e.value.message


def test_unix_url_forms(servers: Servers, tmp_path: Path) -> None:
    img = raw_image(tmp_path / "disk.raw", MiB)
    srv = servers.qemu_nbd(img, "raw", "--export-name=x", "--shared=4")
    for url in (
        f"nbd+unix:///x?socket={srv.sock}",
        f"nbd:unix:{srv.sock}:exportname=x",
    ):
        with open_client(url, timeout=5.0) as c:
            assert c.size == MiB


def test_extended_headers_fall_back_to_compact(
    servers: Servers, tmp_path: Path
) -> None:
    img = raw_image(tmp_path / "disk.raw", 4 * MiB)
    srv = servers.qemu_nbd(img, "raw")
    with Client(srv.sock, extended_headers=True) as c:
        assert not c.extended_headers
        c.write(b"z" * MiB, 0)
        buf = bytearray(MiB)
        c.readinto(buf, 0)
        assert buf == b"z" * MiB
        assert c.extents()[0] == Extent(0, MiB, False)


def test_extents_raw_no_holes_without_depth(servers: Servers, tmp_path: Path) -> None:
    img = raw_image(tmp_path / "disk.raw", 8 * MiB)
    with open(img, "r+b") as f:
        f.seek(2 * MiB)
        f.write(b"d" * MiB)
    srv = servers.qemu_nbd(img, "raw", "--read-only")
    with Client(srv.sock) as c:
        assert c.extents() == [
            Extent(0, 2 * MiB, True),
            Extent(2 * MiB, MiB, False),
            Extent(3 * MiB, 5 * MiB, True),
        ]
        # Clipped to the request, which need not be aligned.
        assert c.extents(MiB + 1, 2 * MiB) == [
            Extent(MiB + 1, MiB - 1, True),
            Extent(2 * MiB, MiB, False),
            Extent(3 * MiB, 1, True),
        ]
        with pytest.raises(ContextNotNegotiated):
            c.dirty_extents()


def test_extents_1tib_sparse_is_quick(servers: Servers, tmp_path: Path) -> None:
    img = raw_image(tmp_path / "huge.raw", 1 << 40)
    with open(img, "r+b") as f:
        f.seek(1 << 39)
        f.write(b"x" * 65536)
    srv = servers.qemu_nbd(img, "raw", "--read-only")
    with Client(srv.sock) as c:
        start = time.monotonic()
        ext = c.extents()
        elapsed = time.monotonic() - start
    assert elapsed < 10
    assert ext == [
        Extent(0, 1 << 39, True),
        Extent(1 << 39, 65536, False),
        Extent((1 << 39) + 65536, (1 << 39) - 65536, True),
    ]


def test_allocation_depth_holes_on_qcow2_overlay(
    servers: Servers, tmp_path: Path
) -> None:
    base = tmp_path / "base.qcow2"
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-f", "qcow2", base, "8M")
    qemu_io(base, "qcow2", "write -P 1 0 1M")
    qemu_img("create", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
    qemu_io(top, "qcow2", "write -P 2 4M 1M")
    srv = servers.qemu_nbd(top, "qcow2", "--read-only", "--allocation-depth")
    with Client(srv.sock) as c:
        assert c.has_allocation_depth
        assert c.extents() == [
            Extent(0, MiB, False, hole=False),  # data in the backing file
            Extent(MiB, 3 * MiB, True, hole=True),
            Extent(4 * MiB, MiB, False, hole=False),  # data in the top layer
            Extent(5 * MiB, 3 * MiB, True, hole=True),
        ]
    # Without the context, the same layer reports no holes at all.
    srv2 = servers.qemu_nbd(top, "qcow2", "--read-only")
    with Client(srv2.sock) as c:
        assert not c.has_allocation_depth
        assert not any(e.hole for e in c.extents())


def test_single_qcow2_layer_holes(servers: Servers, tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-f", "qcow2", base, "4M")
    qemu_io(base, "qcow2", "write -P 1 0 2M")
    qemu_img("create", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
    qemu_io(top, "qcow2", "write -P 2 1M 1M")
    layer = json.dumps(
        {
            "driver": "qcow2",
            "backing": None,
            "file": {"driver": "file", "filename": str(top)},
        }
    )
    layer = "json:" + layer
    srv = servers.qemu_nbd(layer, "qcow2", "--read-only", "--allocation-depth")
    with Client(srv.sock) as c:
        ext = c.extents()
    assert ext == [
        Extent(0, MiB, True, hole=True),
        Extent(MiB, MiB, False),
        Extent(2 * MiB, 2 * MiB, True, hole=True),
    ]


def make_bitmap_image(tmp_path: Path, *bitmaps: str) -> Path:
    img = tmp_path / "disk.qcow2"
    qemu_img("create", "-f", "qcow2", img, "16M")
    qemu_io(img, "qcow2", "write -P 9 0 2M")
    for b in bitmaps:
        qemu_img("bitmap", "--add", img, b)
    qemu_io(img, "qcow2", "write -P 3 1M 64k", "write -P 4 8M 1M", "write -z 12M 1M")
    return img


def test_dirty_extents(servers: Servers, tmp_path: Path) -> None:
    img = make_bitmap_image(tmp_path, "b0")
    srv = servers.qemu_nbd(img, "qcow2", "--read-only", "-B", "b0")
    for bitmap in ("b0", ANY_BITMAP):
        with Client(srv.sock, dirty_bitmap=bitmap) as c:
            assert c.dirty_bitmap == "b0"
            ext = c.dirty_extents()
            dirty = [(e.start, e.length, e.zero) for e in ext if e.dirty]
            assert dirty == [
                (MiB, 65536, False),
                (8 * MiB, MiB, False),
                (12 * MiB, MiB, True),
            ]
            assert sum(e.length for e in ext) == 16 * MiB
            assert not any(e.hole for e in ext)


def test_dirty_bitmap_errors(servers: Servers, tmp_path: Path) -> None:
    img = make_bitmap_image(tmp_path, "b1", "b2")
    srv = servers.qemu_nbd(img, "qcow2", "--read-only", "-B", "b1", "-B", "b2")
    with pytest.raises(DirtyBitmapError, match="several"):
        Client(srv.sock, dirty_bitmap=ANY_BITMAP)
    with pytest.raises(DirtyBitmapError, match="nope"):
        Client(srv.sock, dirty_bitmap="nope")
    with Client(srv.sock, dirty_bitmap="b2") as c:
        assert c.dirty_bitmap == "b2"
    srv2 = servers.qemu_nbd(img, "qcow2", "--read-only")
    with pytest.raises(DirtyBitmapError, match="no dirty bitmap"):
        Client(srv2.sock, dirty_bitmap=ANY_BITMAP)


def test_written_qcow2_matches_qemu_img_compare(
    servers: Servers, tmp_path: Path
) -> None:
    img = tmp_path / "out.qcow2"
    qemu_img("create", "-f", "qcow2", img, "32M")
    srv = servers.qemu_nbd(img, "qcow2", "--shared=8")
    expected = bytearray(32 * MiB)
    with Client(srv.sock) as c:
        for i, off in enumerate(range(0, 32 * MiB, 5 * MiB)):
            chunk = pattern(MiB + 4096 * i, i)
            c.write(chunk, off)
            expected[off : off + len(chunk)] = chunk
        c.zero(MiB + 4096, 4096, punch_hole=True)
        expected[MiB + 4096 : MiB + 8192] = bytes(4096)
        c.flush()
    srv.kill()
    ref = tmp_path / "expected.raw"
    ref.write_bytes(expected)
    qemu_img("compare", "-f", "raw", "-F", "qcow2", ref, img)
    out = subprocess.run(
        ["nbdcopy", "--", "[", "qemu-nbd", "-r", "-f", "qcow2", str(img), "]", "-"],
        check=True,
        capture_output=True,
    ).stdout
    assert out == expected


@pytest.mark.slow
def test_server_killed_midway(servers: Servers) -> None:
    shm = Path("/dev/shm") / f"diskferry-nbd-{os.getpid()}.raw"
    shm.write_bytes(pattern(256 * MiB))
    try:
        srv = servers.qemu_nbd(shm, "raw", "--read-only")
        c = Client(srv.sock, timeout=5.0)
        buf = bytearray(256 * MiB)
        c.readinto(buf, 0)  # it works before the kill

        def kill() -> None:
            time.sleep(0.05)
            os.kill(srv.proc.pid, signal.SIGKILL)

        t = threading.Thread(target=kill)
        t.start()
        start = time.monotonic()
        with pytest.raises((ConnectionClosed, ProtocolError)):
            while time.monotonic() - start < 20:
                c.readinto(buf, 0)
        t.join()
        assert time.monotonic() - start < 5
        with pytest.raises(NbdError):
            c.readinto(bytearray(10), 0)
        c.close()
    finally:
        shm.unlink()
