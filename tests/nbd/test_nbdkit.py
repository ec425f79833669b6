"""The client against real nbdkit plugins and filters."""

from __future__ import annotations

import errno
import struct
import time
from pathlib import Path

import pytest

from diskferry.extent import Extent
from diskferry.nbd import Client, RequestError

from .procs import Servers

MiB = 1 << 20


def pattern_bytes(offset: int, length: int) -> bytes:
    """What nbdkit-pattern-plugin serves: each 8-byte word is its offset."""
    start = offset - offset % 8
    words = b"".join(struct.pack(">Q", o) for o in range(start, offset + length + 8, 8))
    return words[offset - start : offset - start + length]


def test_memory_1tib_extents(servers: Servers) -> None:
    srv = servers.nbdkit("memory", "size=1T")
    with Client(srv.sock) as c:
        c.write(b"x" * 65536, 1 << 39)
        start = time.monotonic()
        ext = c.extents()
        assert time.monotonic() - start < 10
    assert ext == [
        Extent(0, 1 << 39, True),
        Extent(1 << 39, 65536, False),
        Extent((1 << 39) + 65536, (1 << 39) - 65536, True),
    ]


def test_error_filter_fails_requests_connection_usable(
    servers: Servers, tmp_path: Path
) -> None:
    trigger = tmp_path / "inject"
    srv = servers.nbdkit(
        "memory",
        "size=8M",
        "error=EIO",
        "error-pread-rate=100%",
        "error-pwrite-rate=100%",
        f"error-file={trigger}",
        filters=("error",),
    )
    with Client(srv.sock, request_size=MiB) as c:
        c.write(b"a" * 4 * MiB, 0)
        trigger.touch()
        buf = bytearray(4 * MiB)
        with pytest.raises(RequestError) as e:
            c.readinto(buf, 0)
        assert e.value.errno == errno.EIO
        with pytest.raises(RequestError) as e:
            c.write(b"b" * MiB, 0)
        assert e.value.errno == errno.EIO
        trigger.unlink()
        c.readinto(buf, 0)
        assert buf == b"a" * 4 * MiB


def test_delay_filter_pipelining(servers: Servers) -> None:
    srv = servers.nbdkit("pattern", "size=64M", "rdelay=50ms", filters=("delay",))
    with Client(srv.sock, request_size=256 * 1024, queue_depth=16) as c:
        buf = bytearray(8 * MiB)
        start = time.monotonic()
        c.readinto(buf, 3 * MiB + 8)
        elapsed = time.monotonic() - start
        # 32 requests of 50 ms each: 1.6 s one at a time, ~0.1 s pipelined.
        assert elapsed < 1.2, elapsed
        assert buf == pattern_bytes(3 * MiB + 8, 8 * MiB)
        hs = [c.submit_read(bytearray(4096), off) for off in range(0, 64 * 4096, 4096)]
        for h in reversed(hs):
            c.wait(h)
        assert all(
            h.buffer is not None and bytes(h.buffer) == pattern_bytes(h.offset, 4096)
            for h in hs
        )


def test_nozero_filter_emulates_zero(servers: Servers) -> None:
    srv = servers.nbdkit("memory", "size=4M", filters=("nozero",))
    with Client(srv.sock) as c:
        assert not c.can_zero and not c.can_fast_zero
        c.write(b"y" * 4 * MiB, 0)
        c.zero(MiB, 2 * MiB + 512, punch_hole=False)
        buf = bytearray(4 * MiB)
        c.readinto(buf, 0)
    assert buf == b"y" * MiB + bytes(2 * MiB + 512) + b"y" * (MiB - 512)


def test_noextents_filter_reports_data(servers: Servers) -> None:
    srv = servers.nbdkit("memory", "size=4M", filters=("noextents",))
    with Client(srv.sock) as c:
        assert c.extents() == [Extent(0, 4 * MiB, False)]


def test_blocksize_policy_maximum_honoured(servers: Servers) -> None:
    srv = servers.nbdkit(
        "pattern",
        "size=16M",
        "blocksize-minimum=512",
        "blocksize-preferred=4096",
        "blocksize-maximum=1M",
        "blocksize-error-policy=error",
        filters=("blocksize-policy",),
    )
    with Client(srv.sock, request_size=8 * MiB) as c:
        assert c.block_size == (512, 4096, MiB)
        assert c.request_size == MiB
        buf = bytearray(5 * MiB)
        c.readinto(buf, 512)
        assert buf == pattern_bytes(512, 5 * MiB)
        with pytest.raises(ValueError, match="aligned"):
            c.readinto(bytearray(100), 0)
        # The server does refuse larger requests: splitting is not optional.
        big = bytearray(2 * MiB)
        h = c._submit(0, 0, len(big), buffer=memoryview(big))
        with pytest.raises(RequestError) as e:
            c.wait(h)
        assert e.value.errno == errno.EINVAL


def test_blocksize_filter_splits_server_side(servers: Servers) -> None:
    srv = servers.nbdkit("pattern", "size=64M", "maxdata=1M", filters=("blocksize",))
    with Client(srv.sock) as c:
        buf = bytearray(40 * MiB)
        c.readinto(buf, 0)
        assert buf == pattern_bytes(0, 40 * MiB)


def test_sparse_random_extents_match_data(servers: Servers) -> None:
    srv = servers.nbdkit("sparse-random", "size=64M", "seed=7")
    with Client(srv.sock) as c:
        ext = c.extents()
        assert sum(e.length for e in ext) == 64 * MiB
        assert any(e.zero for e in ext) and any(not e.zero for e in ext)
        buf = bytearray(64 * MiB)
        c.readinto(buf, 0)
    for e in ext:
        if e.zero:
            assert buf[e.start : e.end].count(0) == e.length
    data = sum(e.length for e in ext if not e.zero)
    assert data > 0


def test_file_plugin_roundtrip(servers: Servers, tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.truncate(8 * MiB)
    srv = servers.nbdkit("file", str(img))
    with Client(srv.sock) as c:
        assert c.can_multi_conn and c.can_flush and c.can_trim and c.can_zero
        c.write(b"f" * 3 * MiB, MiB, fua=True)
        c.zero(2 * MiB, MiB, punch_hole=True)
        if not c.can_fast_zero:
            with pytest.raises(RequestError) as e:
                c.zero(0, MiB, punch_hole=True, fast=True)
            assert e.value.errno == errno.ENOTSUP
        c.trim(6 * MiB, MiB)
        c.flush()
    data = img.read_bytes()
    assert data[MiB : 2 * MiB] == data[3 * MiB : 4 * MiB] == b"f" * MiB
    assert data[2 * MiB : 3 * MiB] == bytes(MiB)


def test_without_structured_replies(servers: Servers) -> None:
    srv = servers.nbdkit("--no-sr", "pattern", "size=8M")
    with Client(srv.sock, request_size=MiB) as c:
        assert not c.info.structured_replies
        buf = bytearray(3 * MiB)
        c.readinto(buf, 4096)
        assert buf == pattern_bytes(4096, 3 * MiB)
        assert c.extents() == [Extent(0, 8 * MiB, False)]


def test_extended_headers_refused_by_nbdkit(servers: Servers) -> None:
    srv = servers.nbdkit("memory", "size=1M", tcp=True)
    with Client(srv.address, extended_headers=True) as c:
        assert not c.extended_headers
        c.write(b"t" * 4096, 0)
        buf = bytearray(4096)
        c.readinto(buf, 0)
        assert buf == b"t" * 4096
