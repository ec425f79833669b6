"""The backend interface and the extent record every backend reports."""

from typing import Protocol

from diskferry.extent import Extent

__all__ = ["Backend", "Extent"]


class Backend(Protocol):
    """What a handler needs from storage; one instance per connection."""

    def size(self) -> int:
        """Size of the image in bytes."""

    def readinto(self, offset: int, buf: memoryview) -> int:
        """Read at ``offset`` into ``buf``; returns bytes read (short at EOF)."""

    def write(self, offset: int, data: memoryview) -> int:
        """Write all of ``data`` at ``offset``; returns ``len(data)``."""

    def zero(self, offset: int, length: int, punch_hole: bool) -> None:
        """Make the range read as zeros, deallocating it if ``punch_hole``."""

    def flush(self) -> None:
        """Make every completed write of every connection durable."""

    def extents(self, start: int, length: int) -> list[Extent]:
        """Zero-context extents covering ``[start, start+length)``, merged."""

    def fileno(self) -> int | None:
        """A descriptor for ``sendfile``/``splice``, or None if there is none."""

    def close(self) -> None:
        """Release the backend's resources."""
