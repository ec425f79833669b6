"""Page-aligned memory for I/O buffers, shared by backends and handlers.

``O_DIRECT`` needs memory aligned to the device's logical block size
(512 or 4096); anonymous ``mmap`` memory is page aligned, which satisfies
both, and is returned to the system when the buffer is closed.
"""

import mmap
import threading

#: Alignment of every buffer: a page, the largest logical block size in use.
ALIGNMENT = mmap.PAGESIZE


def aligned_buffer(size: int) -> mmap.mmap:
    """Zeroed, page-aligned memory of at least ``size`` bytes."""
    size = (size + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT
    return mmap.mmap(-1, max(size, ALIGNMENT))


class BufferPool:
    """I/O buffers lent to requests and given back when they end.

    A connection holds a buffer only while one of its requests runs, so
    the daemon's memory follows the requests in flight, not the
    connections open: a thousand idle keep-alive connections hold none.
    At most ``limit`` buffers are lent at once; a request that finds none
    waits for one (each request takes at most one, so waiting cannot
    deadlock). Returned buffers are kept for reuse (their pages are
    already mapped), ``keep`` of them at most.
    """

    def __init__(self, limit: int = 64, keep: int = 8) -> None:
        self.limit = limit
        self.keep = keep
        self._free: list[mmap.mmap] = []
        self._lent = 0
        self._cond = threading.Condition()

    @property
    def lent(self) -> int:
        return self._lent

    def take(self, size: int) -> mmap.mmap:
        """A buffer of at least ``size`` bytes (contents undefined)."""
        with self._cond:
            while self._lent >= self.limit:
                self._cond.wait()
            self._lent += 1
            for i, buf in enumerate(self._free):
                if len(buf) >= size:
                    return self._free.pop(i)
        try:
            return aligned_buffer(size)
        except BaseException:
            self.give(None)
            raise

    def give(self, buf: mmap.mmap | None) -> None:
        """Return a buffer ``take`` lent (None: the take failed)."""
        with self._cond:
            self._lent -= 1
            self._cond.notify()
            if buf is not None and len(self._free) < self.keep:
                self._free.append(buf)
                buf = None
        if buf is not None:
            try:
                buf.close()
            except BufferError:  # a view is still referenced; GC frees it
                pass


#: The daemon's pool: 64 lent at once is 512 MiB of 8 MiB buffers, well
#: above what two cores keep busy, and a bound on what a flood of
#: concurrent requests can make the daemon map.
POOL = BufferPool()
