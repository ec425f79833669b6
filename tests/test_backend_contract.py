"""One contract, every local backend: what a handler may count on from
``Backend`` whichever storage is behind it (a file, buffered or
O_DIRECT, an NBD export through qemu-nbd, the memory image of tests).

The proxy's backend keeps the same contract through a server; it is
tested end to end in tests/proxy.
"""

import pytest

import nbd_servers
from diskferry.daemon.backends.file import FileBackend
from diskferry.daemon.backends.memory import MemoryBackend
from diskferry.daemon.backends.nbd import NbdBackend
from diskferry.daemon.buffers import aligned_buffer
from diskferry.errors import NotAvailable

MiB = 1024**2
SIZE = 4 * MiB


@pytest.fixture(params=["file", "file-direct", "nbd", "memory"])
def backend(request, tmp_path):
    path = tmp_path / "img"
    with open(path, "wb") as f:
        f.truncate(SIZE)
    if request.param == "memory":
        b = MemoryBackend(SIZE)
        yield b
        b.close()
    elif request.param == "nbd":
        with nbd_servers.start_export("qemu-nbd", path) as export:
            b = NbdBackend(export.url)
            yield b
            b.close()
    else:
        b = FileBackend(str(path), writable=True,
                        direct=request.param == "file-direct")
        yield b
        b.close()


def buffer_of(data):
    """``data`` in an aligned buffer, as the daemon's pool lends them."""
    buf = aligned_buffer(len(data))
    buf[:] = data
    return memoryview(buf)


def read(backend, offset, length):
    buf = aligned_buffer(length)
    with memoryview(buf) as view:
        n = backend.readinto(view, offset)
    return bytes(buf[:n])


def test_size(backend):
    assert backend.size() == SIZE


def test_write_then_read(backend):
    data = bytes(range(256)) * 4096  # 1 MiB
    assert backend.write(buffer_of(data), MiB) == len(data)
    assert read(backend, MiB, len(data)) == data
    assert read(backend, 0, MiB) == bytes(MiB)


def test_read_is_short_at_the_end(backend):
    assert read(backend, SIZE - 4096, 2 * 4096) == bytes(4096)
    assert read(backend, SIZE, 4096) == b""


@pytest.mark.parametrize("punch_hole", [False, True])
def test_zero(backend, punch_hole):
    backend.write(buffer_of(b"x" * (2 * MiB)), MiB)
    backend.zero(MiB + 4096, MiB, punch_hole=punch_hole)
    assert read(backend, MiB, 2 * MiB) == (
        b"x" * 4096 + bytes(MiB) + b"x" * (MiB - 4096))
    backend.zero(0, 0, punch_hole=punch_hole)  # nothing, and no error


def test_extents_cover_the_range_merged(backend):
    backend.write(buffer_of(b"d" * MiB), MiB)
    for start, length in [(0, SIZE), (4096, 3 * MiB), (MiB, MiB)]:
        extents = backend.extents(start, length)
        assert extents[0].start == start
        assert extents[-1].end == start + length
        for a, b in zip(extents, extents[1:], strict=False):
            assert a.end == b.start
            assert (a.zero, a.hole) != (b.zero, b.hole)
    data = [e for e in backend.extents(0, SIZE) if not e.zero]
    assert data and all(MiB <= e.start and e.end <= 2 * MiB for e in data)


def test_flush(backend):
    backend.write(buffer_of(b"f" * 4096), 0)
    backend.flush()
    assert read(backend, 0, 4096) == b"f" * 4096


def test_no_dirty_extents_without_a_bitmap(backend):
    with pytest.raises(NotAvailable):
        backend.dirty_extents(0, SIZE)


def test_limits_and_features(backend):
    assert backend.max_readers >= 1 and backend.max_writers >= 1
    assert backend.buffer_size > 0
    assert backend.features == {"checksum", "extents", "flush", "zero"}
    assert backend.writable
    assert not backend.remote
