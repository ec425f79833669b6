"""Positional reads and writes that finish the job.

``os.pwrite`` and ``os.preadv`` may move fewer bytes than asked (a signal,
a file system's own limit); every caller wants all of them or an error,
so the loop lives here once, for the daemon and the client alike.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing_extensions import Buffer


def pwrite_all(fd: int, data: Buffer, offset: int) -> int:
    """Write all of ``data`` at ``offset``; returns its length."""
    view = memoryview(data)
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)
    return done


def preadv_full(fd: int, buf: Buffer, offset: int) -> int:
    """Read into ``buf`` from ``offset`` until it is full or the file
    ends; returns the bytes read."""
    view = memoryview(buf)
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            break
        done += n
    return done
