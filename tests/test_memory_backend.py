"""The in-memory backend: reads, writes, zeroing and extents."""

import pytest

from diskferry.daemon.backends.base import (
    Extent,
    ZeroCopyFile,
    offers_zero_copy_file,
)
from diskferry.daemon.backends.memory import ZERO_GRANULARITY, MemoryBackend
from diskferry.errors import BackendError

G = ZERO_GRANULARITY


def test_new_image_is_zero():
    backend = MemoryBackend(3 * G)
    assert backend.size() == 3 * G
    assert backend.data == bytes(3 * G)
    assert backend.extents(0, 3 * G) == [Extent(0, 3 * G, zero=True)]


def test_initial_data():
    backend = MemoryBackend(b"abc")
    assert backend.size() == 3
    assert backend.data == b"abc"


def test_negative_size():
    with pytest.raises(ValueError):
        MemoryBackend(-1)


def test_readinto_reuses_buffer_and_is_short_at_end():
    backend = MemoryBackend(b"0123456789")
    buf = bytearray(4)
    assert backend.readinto(memoryview(buf), 2) == 4
    assert buf == b"2345"
    assert backend.readinto(memoryview(buf), 8) == 2
    assert buf[:2] == b"89"
    assert backend.readinto(memoryview(buf), 10) == 0
    assert backend.readinto(memoryview(buf), 20) == 0


def test_write_and_read_back():
    backend = MemoryBackend(10)
    assert backend.write(memoryview(b"xyz"), 3) == 3
    assert backend.data == b"\0\0\0xyz\0\0\0\0"


def test_write_past_end_fails():
    backend = MemoryBackend(10)
    with pytest.raises(BackendError, match="outside"):
        backend.write(memoryview(b"xyz"), 8)
    assert backend.data == bytes(10)


@pytest.mark.parametrize("punch_hole", [True, False])
def test_zero(punch_hole):
    backend = MemoryBackend(b"x" * 10)
    backend.zero(2, 5, punch_hole)
    assert backend.data == b"xx\0\0\0\0\0xxx"


def test_zero_past_end_fails():
    backend = MemoryBackend(10)
    with pytest.raises(BackendError):
        backend.zero(5, 6, False)


@pytest.mark.parametrize("layout, expected", [
    # Chunks of the image, "d" data and "z" zero, and the merged extents.
    ("", []),
    ("z", [(0, G, True)]),
    ("d", [(0, G, False)]),
    ("dzz", [(0, G, False), (G, 2 * G, True)]),
    ("zzdd", [(0, 2 * G, True), (2 * G, 2 * G, False)]),
    ("dzdzz", [(0, G, False), (G, G, True), (2 * G, G, False),
               (3 * G, 2 * G, True)]),
])
def test_extents(layout, expected):
    backend = MemoryBackend(len(layout) * G)
    for i, kind in enumerate(layout):
        if kind == "d":
            backend.write(memoryview(b"x"), i * G + G // 2)
    extents = backend.extents(0, backend.size())
    assert extents == [Extent(s, n, z) for s, n, z in expected]
    assert not any(e.hole for e in extents)


def test_extents_of_a_range_are_clipped():
    backend = MemoryBackend(4 * G)
    backend.write(memoryview(b"x"), 2 * G)
    assert backend.extents(G + 100, 2 * G) == [
        Extent(G + 100, G - 100, True), Extent(2 * G, G, False),
        Extent(3 * G, 100, True)]


def test_extents_stop_at_end_of_image():
    backend = MemoryBackend(G + 10)
    backend.write(memoryview(b"x"), G)
    assert backend.extents(0, 10 * G) == [
        Extent(0, G, True), Extent(G, 10, False)]


def test_no_file_descriptor():
    backend = MemoryBackend(1)
    assert not isinstance(backend, ZeroCopyFile)
    assert not offers_zero_copy_file(backend)


def test_closed_backend_fails():
    backend = MemoryBackend(10)
    backend.flush()
    backend.close()
    with pytest.raises(BackendError, match="closed"):
        backend.readinto(memoryview(bytearray(1)), 0)
