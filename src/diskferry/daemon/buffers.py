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
    At most ``limit`` buffers are lent at once; ``take`` waits for one
    (each request takes at most one, so waiting cannot deadlock), and
    ``try_take`` does not: the daemon's requests never wait, they fall
    back to a small buffer (``SMALL_POOL``), so that a client that stalls
    holding a buffer costs no other client time. Returned buffers are
    kept for reuse (their pages are already mapped), ``keep`` at most.
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
        """A buffer of at least ``size`` bytes (contents undefined),
        waiting for one while ``limit`` are lent."""
        buf = self._take(size, wait=True)
        assert buf is not None
        return buf

    def try_take(self, size: int) -> mmap.mmap | None:
        """``take``, or None at once while ``limit`` are lent."""
        return self._take(size, wait=False)

    def _take(self, size: int, wait: bool) -> mmap.mmap | None:
        with self._cond:
            while self._lent >= self.limit:
                if not wait:
                    return None
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

#: Size of a small buffer: what a request needing no more takes (a 4 KiB
#: range, a short chunk), and what a large request falls back to while
#: the pool's buffers are all lent, so that clients that stall with a
#: large buffer each never make another client wait. Two TLS records'
#: worth of 64 KiB; 1,000 connections hold 125 MiB of them at most.
SMALL_BUFFER = 128 * 1024

#: Small buffers: as many as requests run (the connection limit bounds
#: them, not this pool), the last 64 kept for reuse.
SMALL_POOL = BufferPool(limit=1 << 30, keep=64)
