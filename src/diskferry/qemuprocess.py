"""What the client and the daemon share to run a qemu program for a while.

Both start ``qemu-nbd`` to serve an image that is not raw: the client for
one copy, the daemon for a ticket's life. Neither may leave one behind,
even when killed with SIGKILL: the kernel is asked to stop the child when
the thread that started it dies (``PR_SET_PDEATHSIG``). The image is
named by a ``json:`` filename (a blockdev tree), so that qemu guesses
nothing: not the format, not a protocol hidden in a file name.
"""

import ctypes
import json
import signal

#: <sys/prctl.h>
_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM when the thread that
    started it dies (SIGTERM, so that qemu-nbd flushes and removes its
    socket)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def blockdev_filename(spec: dict[str, object]) -> str:
    """The ``json:`` filename of a blockdev tree (compact, one line)."""
    return "json:" + json.dumps(spec, separators=(",", ":"))
