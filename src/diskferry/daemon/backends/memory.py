"""An image held in memory, for tests of everything above the backend layer.

It behaves like a fixed-size block device: reads past the end are short,
writes past the end fail. Extents are found by looking at the content
in ``ZERO_GRANULARITY`` chunks, the way a file system reports allocation
per block: an all-zero chunk is zero, any other chunk is data. Every byte
is allocated memory, so it never reports a hole (``Extent.hole``: no
layer allocates the range); zero chunks are allocated zeros.
"""

from typing import TYPE_CHECKING

from diskferry.errors import BackendError, NotAvailable

from .base import ALL_FEATURES, Backend, Extent

#: Size of the chunks extents are reported in, as a file system block.
ZERO_GRANULARITY = 4096

_ZERO_CHUNK = bytes(ZERO_GRANULARITY)


class MemoryBackend:
    """A ``Backend`` over a bytearray; ``content`` is a size or initial bytes."""

    max_readers = 8
    max_writers = 8
    buffer_size = 1024**2
    features = ALL_FEATURES
    remote = False
    writable = True

    def __init__(self, content: int | bytes = 0) -> None:
        if isinstance(content, int):
            if content < 0:
                raise ValueError(f"negative image size: {content}")
            self._data = bytearray(content)
        else:
            self._data = bytearray(content)
        self._closed = False

    @property
    def data(self) -> bytes:
        """The image content, for tests to inspect."""
        return bytes(self._data)

    def size(self) -> int:
        self._check_open()
        return len(self._data)

    def readinto(self, buf: memoryview, offset: int) -> int:
        self._check_open()
        with memoryview(buf).cast("B") as view:
            count = max(0, min(len(view), len(self._data) - offset))
            view[:count] = self._data[offset:offset + count]
        return count

    def write(self, data: memoryview, offset: int) -> int:
        self._check_open()
        with memoryview(data).cast("B") as view:
            self._check_range(offset, len(view))
            self._data[offset:offset + len(view)] = view
            return len(view)

    def zero(self, offset: int, length: int, punch_hole: bool) -> None:
        self._check_open()
        self._check_range(offset, length)
        self._data[offset:offset + length] = bytes(length)

    def flush(self) -> None:
        self._check_open()

    def extents(self, start: int, length: int) -> list[Extent]:
        self._check_open()
        end = min(start + length, len(self._data))
        result: list[Extent] = []
        offset = start
        while offset < end:
            chunk_end = min(_next_chunk_boundary(offset), end)
            zero = self._is_zero(offset, chunk_end)
            if result and result[-1].zero == zero:
                last = result.pop()
                result.append(Extent(last.start, chunk_end - last.start, zero))
            else:
                result.append(Extent(offset, chunk_end - offset, zero))
            offset = chunk_end
        return result

    def dirty_extents(self, start: int, length: int) -> list[Extent]:
        raise NotAvailable("a memory image has no dirty bitmap")

    def close(self) -> None:
        self._closed = True

    def _is_zero(self, start: int, end: int) -> bool:
        with memoryview(self._data)[start:end] as view:
            return _ZERO_CHUNK.startswith(view)

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or offset + length > len(self._data):
            raise BackendError(
                f"range {offset}+{length} is outside the image "
                f"of {len(self._data)} bytes")

    def _check_open(self) -> None:
        if self._closed:
            raise BackendError("the backend is closed")


def _next_chunk_boundary(offset: int) -> int:
    return (offset // ZERO_GRANULARITY + 1) * ZERO_GRANULARITY


if TYPE_CHECKING:
    # mypy checks MemoryBackend against the protocol it claims.
    _backend: type[Backend] = MemoryBackend
