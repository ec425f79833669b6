"""One daemon per run directory: an exclusive lock held for the process's life.

Why ``flock(2)`` and not a pid file: a pid file outlives a killed daemon
and its pid may be reused by an unrelated process, so "is it stale?" has
no safe answer. A flock is dropped by the kernel when its holder dies,
however it dies: a lock that can be taken is never held by a live
daemon. The pid written in the file serves only the message that the
next daemon prints.

The holder removes the file at a clean stop. Another daemon may have
opened the file just before the removal and then lock a file that no
longer has a name, while a third creates a new one: two "holders". So
after locking, a daemon checks that the path still names the file it
locked, and starts over if it does not.
"""

from __future__ import annotations

import fcntl
import os

from diskferry.errors import DiskferryError

#: Name of the lock file in the run directory.
LOCK_NAME = "diskferry.lock"

#: Bytes read back from a lock file for the holder's pid.
_PID_MAX = 32


class InstanceLocked(DiskferryError):
    """Raised when a live process holds the run directory's lock."""

    def __init__(self, path: str, pid: int | None) -> None:
        holder = f"pid {pid}" if pid else "pid unknown"
        super().__init__(
            f"another daemon ({holder}) holds {path}; stop it, or give "
            f"this one its own [daemon] run_dir (or state_dir) and its own "
            f"addresses")
        self.path = path
        self.pid = pid


class InstanceLock:
    """The lock of one run directory; ``acquire()`` or raise."""

    def __init__(self, run_dir: str) -> None:
        self.path = os.path.join(run_dir, LOCK_NAME)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock and write our pid in it; raise InstanceLocked if
        another process holds it."""
        if self._fd is not None:
            return
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                         0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = _read_pid(fd)
                os.close(fd)
                raise InstanceLocked(self.path, pid) from None
            except BaseException:
                os.close(fd)
                raise
            if _names(self.path, fd):
                break
            # Removed (and maybe created anew) by the previous holder
            # between our open and our lock: lock what the path names now.
            os.close(fd)
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def release(self) -> None:
        """Remove the lock file (if it is still ours) and drop the lock."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if _names(self.path, fd):
                os.unlink(self.path)
        finally:
            os.close(fd)

    def __enter__(self) -> InstanceLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _names(path: str, fd: int) -> bool:
    """True if ``path`` is the file open as ``fd``."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    fst = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (fst.st_dev, fst.st_ino)


def _read_pid(fd: int) -> int | None:
    """The pid in a lock file; None while its holder has not written it."""
    try:
        text = os.pread(fd, _PID_MAX, 0).decode("ascii", "replace")
        return int(text.strip()) or None
    except (OSError, ValueError):
        return None
