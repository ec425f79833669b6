"""The file backend on real sparse files, O_DIRECT, and a loop device."""

import os
import time

import pytest

import loopdev
from diskferry.daemon.backends.file import FileBackend
from diskferry.daemon.buffers import aligned_buffer
from diskferry.errors import BackendError

MiB = 1024**2


def allocated(path):
    return os.stat(path).st_blocks * 512


@pytest.fixture
def sparse_file(tmp_path):
    """8 MiB: data at 1 MiB (64 KiB) and at 6 MiB (4 KiB), holes elsewhere."""
    path = tmp_path / "sparse.raw"
    with open(path, "wb") as f:
        f.truncate(8 * MiB)
        f.seek(1 * MiB)
        f.write(b"a" * 64 * 1024)
        f.seek(6 * MiB)
        f.write(b"b" * 4096)
    return path


def test_extents_of_sparse_file(sparse_file):
    b = FileBackend(str(sparse_file))
    try:
        ext = [(e.start, e.length, e.zero, e.hole)
               for e in b.extents(0, b.size())]
    finally:
        b.close()
    assert ext == [
        (0, MiB, True, True),
        (MiB, 64 * 1024, False, False),
        (MiB + 64 * 1024, 5 * MiB - 64 * 1024, True, True),
        (6 * MiB, 4096, False, False),
        (6 * MiB + 4096, 2 * MiB - 4096, True, True),
    ]


def test_extents_part_of_image(sparse_file):
    b = FileBackend(str(sparse_file))
    try:
        ext = [(e.start, e.length, e.zero) for e in b.extents(MiB + 4096, MiB)]
    finally:
        b.close()
    assert ext == [(MiB + 4096, 60 * 1024, False),
                   (MiB + 64 * 1024, MiB - 60 * 1024, True)]


def test_extents_fully_allocated(tmp_path):
    path = tmp_path / "full.raw"
    path.write_bytes(b"x" * MiB)
    b = FileBackend(str(path))
    try:
        assert [(e.start, e.length, e.zero) for e in b.extents(0, MiB)] == [
            (0, MiB, False)]
    finally:
        b.close()


def test_zero_punches_hole_on_sparse(sparse_file):
    b = FileBackend(str(sparse_file), writable=True, sparse=True)
    before = allocated(sparse_file)
    try:
        b.zero(MiB, 64 * 1024, punch_hole=True)
        b.flush()
    finally:
        b.close()
    assert allocated(sparse_file) == before - 64 * 1024
    with open(sparse_file, "rb") as f:
        f.seek(MiB)
        assert f.read(64 * 1024) == b"\0" * 64 * 1024


def test_zero_keeps_allocation_when_not_sparse(tmp_path):
    path = tmp_path / "full.raw"
    path.write_bytes(b"x" * MiB)
    b = FileBackend(str(path), writable=True)
    try:
        b.zero(4096, 8192, punch_hole=False)
    finally:
        b.close()
    data = path.read_bytes()
    assert data == b"x" * 4096 + b"\0" * 8192 + b"x" * (MiB - 12288)
    assert allocated(path) >= MiB


@pytest.mark.parametrize("direct", [False, True])
@pytest.mark.parametrize("offset,length", [
    (0, 8192), (100, 5000), (4095, 4097), (1, 3), (4096 * 3 - 7, 20000),
])
def test_write_then_read_unaligned(tmp_path, direct, offset, length):
    """Writes land exactly in their range, in buffered and O_DIRECT mode."""
    path = tmp_path / "img.raw"
    size = 64 * 1024 + 123
    path.write_bytes(b"\xee" * size)
    payload = os.urandom(length)
    buf = aligned_buffer(length)
    buf[:length] = payload
    b = FileBackend(str(path), writable=True, direct=direct)
    try:
        assert b.write(memoryview(buf)[:length], offset) == length
        b.flush()
        out = aligned_buffer(length)
        assert b.readinto(memoryview(out)[:length], offset) == length
        assert bytes(out[:length]) == payload
    finally:
        b.close()
    data = path.read_bytes()
    assert len(data) == size
    assert data[:offset] == b"\xee" * offset
    assert data[offset:offset + length] == payload
    assert data[offset + length:] == b"\xee" * (size - offset - length)


def test_direct_read_short_at_end(tmp_path):
    path = tmp_path / "odd.raw"
    path.write_bytes(b"z" * 10000)
    b = FileBackend(str(path), direct=True)
    try:
        buf = aligned_buffer(16384)
        assert b.readinto(memoryview(buf)[:8192], 4096) == 10000 - 4096
        assert b.fileno() is None  # no sendfile in direct mode
    finally:
        b.close()


def test_open_errors(tmp_path):
    with pytest.raises(BackendError, match="Cannot open"):
        FileBackend(str(tmp_path / "missing"))
    with pytest.raises(BackendError, match="neither"):
        FileBackend(str(tmp_path))


@pytest.fixture
def loop_device(tmp_path):
    backing = tmp_path / "loop.raw"
    backing.write_bytes(b"L" * 4 * MiB)
    with loopdev.attached(backing) as dev:
        yield dev, backing


@pytest.mark.root
def test_block_device(loop_device):
    dev, backing = loop_device
    b = FileBackend(dev, writable=True)
    try:
        assert b.is_block
        assert b.size() == 4 * MiB
        assert [(e.start, e.length, e.zero) for e in b.extents(0, b.size())] \
            == [(0, 4 * MiB, False)]
        b.write(memoryview(b"D" * 4096), MiB)
        b.zero(2 * MiB, MiB, punch_hole=True)
        b.flush()
    finally:
        b.close()
    data = backing.read_bytes()
    assert data[MiB:MiB + 4096] == b"D" * 4096
    assert data[2 * MiB:3 * MiB] == b"\0" * MiB
    assert data[3 * MiB:] == b"L" * MiB


@pytest.mark.parametrize("writable", [False, True])
def test_fifo_refused_at_once(tmp_path, writable):
    """A FIFO would block open() until a writer came; it is refused."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    start = time.monotonic()
    with pytest.raises(BackendError, match="neither a regular file"):
        FileBackend(str(fifo), writable=writable)
    assert time.monotonic() - start < 1


def test_descriptor_is_blocking(tmp_path):
    image = tmp_path / "disk.raw"
    image.write_bytes(b"x" * 4096)
    b = FileBackend(str(image), writable=True)
    try:
        assert os.get_blocking(b.fileno())
    finally:
        b.close()


def test_close_twice_and_use_after_close(tmp_path):
    path = tmp_path / "img"
    path.write_bytes(b"x" * 4096)
    b = FileBackend(str(path), writable=True, direct=True)
    b.readinto(memoryview(aligned_buffer(4096)), 0)  # opens the read fd
    b.close()
    b.close()  # nothing left to close, and no other file's descriptor
    with pytest.raises(BackendError, match="closed"):
        b.write(memoryview(b"y"), 0)
    with pytest.raises(BackendError, match="closed"):
        b.flush()


def test_close_leaves_no_descriptor(tmp_path):
    path = tmp_path / "img"
    path.write_bytes(b"x" * 8192)
    before = set(os.listdir("/proc/self/fd"))
    for direct in (False, True):
        b = FileBackend(str(path), direct=direct)
        # A buffered backend opens a direct descriptor for its first read.
        b.readinto(memoryview(aligned_buffer(4096)), 4096)
        b.close()
    assert set(os.listdir("/proc/self/fd")) == before
