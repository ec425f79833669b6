"""Memory the benchmark keeps touched, lent to a run that writes new pages.

Some virtual machines hand free memory back to their host (virtio-balloon
free page reporting): a page left free for a few seconds goes back, and
the next write to it costs a host fault, several times what a page freed
a moment ago costs. A download writes a new file, so without care it is
charged for the host's work by the luck of timing, and its figures swing
from run to run.

``WarmMemory`` holds anonymous memory it has written. ``lend(n)`` frees n
bytes of it right before such a run: the kernel hands recently freed
pages out first, so the run's new pages are warm ones. ``take_back()``
touches them again once the run's output is gone. On a machine without
page reporting this costs a memory fill per run, outside the timings.
"""

from __future__ import annotations

import mmap

#: Granule of lending and touching.
CHUNK = 8 * 1024**2

_ONES = b"\1" * CHUNK


class WarmMemory:
    """``size`` bytes (rounded up to ``CHUNK``) kept written."""

    def __init__(self, size: int) -> None:
        self.size = -(-size // CHUNK) * CHUNK
        # Private: MADV_DONTNEED frees private anonymous pages, where a
        # shared mapping (mmap's default) would keep them in shmem.
        self._map = (mmap.mmap(-1, self.size,
                               flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
                     if self.size else None)
        self._lent = self.size
        self.take_back()

    def lend(self, nbytes: int) -> None:
        """Free up to ``nbytes`` for the next run's new pages."""
        self.take_back()
        lent = min(self.size, -(-max(0, nbytes) // CHUNK) * CHUNK)
        if self._map is not None and lent:
            self._map.madvise(mmap.MADV_DONTNEED, 0, lent)
        self._lent = lent

    def take_back(self) -> None:
        """Touch again what was lent (after the run freed its pages)."""
        if self._map is not None:
            for offset in range(0, self._lent, CHUNK):
                self._map[offset:offset + CHUNK] = _ONES
        self._lent = 0

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None
