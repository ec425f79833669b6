"""Page-aligned memory for I/O buffers, shared by backends and handlers.

``O_DIRECT`` needs memory aligned to the device's logical block size
(512 or 4096); anonymous ``mmap`` memory is page aligned, which satisfies
both, and is returned to the system when the buffer is closed.
"""

import mmap

#: Alignment of every buffer: a page, the largest logical block size in use.
ALIGNMENT = mmap.PAGESIZE


def aligned_buffer(size: int) -> mmap.mmap:
    """Zeroed, page-aligned memory of at least ``size`` bytes."""
    size = (size + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT
    return mmap.mmap(-1, max(size, ALIGNMENT))
