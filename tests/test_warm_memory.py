"""``WarmMemory`` frees what it lends and writes it again when taken back."""

from diskferry.benchmark.warmmemory import CHUNK, WarmMemory


def test_lend_frees_the_first_bytes_and_take_back_touches_them():
    warm = WarmMemory(3 * CHUNK - 1)
    try:
        assert warm.size == 3 * CHUNK
        view = warm._map
        assert view is not None
        assert view[:CHUNK] == b"\1" * CHUNK
        warm.lend(CHUNK + 1)  # rounded up to two chunks
        # Private anonymous memory reads zeros after MADV_DONTNEED.
        assert view[:2 * CHUNK] == bytes(2 * CHUNK)
        assert view[2 * CHUNK:] == b"\1" * CHUNK
        warm.take_back()
        assert view[:] == b"\1" * (3 * CHUNK)
    finally:
        warm.close()


def test_lending_more_than_held_lends_all():
    warm = WarmMemory(CHUNK)
    try:
        warm.lend(10 * CHUNK)
        assert warm._map is not None
        assert warm._map[:] == bytes(CHUNK)
    finally:
        warm.close()
