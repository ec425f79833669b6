"""Noticing that a domain's QEMU ended, at once and at no cost meanwhile.

A pull-mode backup lives in the domain's QEMU process: when the domain
is destroyed or shut down, the export and the job are gone with it, and
libvirt says nothing to a client that did not ask. The process that
listens on the job's NBD socket is that QEMU (the kernel names it:
``SO_PEERCRED``), and a pidfd of it becomes readable when it ends: one
thread per job waits on it, polling nothing.
"""

from __future__ import annotations

import logging
import os
import select
import threading
from collections.abc import Callable

log = logging.getLogger("diskferry.daemon.backup")


class ProcessWatch:
    """Calls ``on_exit`` once, from a thread of its own, when process
    ``pid`` ends, unless ``close()`` came first; thread-safe.

    Raises ``ProcessLookupError`` when the process ended already.
    """

    def __init__(self, pid: int, on_exit: Callable[[], None],
                 name: str) -> None:
        self._on_exit = on_exit
        self._pidfd = os.pidfd_open(pid)
        try:
            self._wake = os.eventfd(0, os.EFD_CLOEXEC)
        except BaseException:
            os.close(self._pidfd)
            raise
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name,
                                        daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop watching; waits for the thread unless called from it."""
        with self._lock:
            if not self._closed:
                self._closed = True
                os.eventfd_write(self._wake, 1)
        if threading.current_thread() is not self._thread:
            self._thread.join()

    def _run(self) -> None:
        try:
            ready, _, _ = select.select([self._pidfd, self._wake], [], [])
            with self._lock:
                ended = self._pidfd in ready and not self._closed
            if ended:
                self._on_exit()
        except Exception:
            log.exception("watching process %s", self._thread.name)
        finally:
            with self._lock:
                self._closed = True
                os.close(self._pidfd)
                os.close(self._wake)
