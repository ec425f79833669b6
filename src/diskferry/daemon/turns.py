"""Turns at writing received bulk data to storage, shared by the daemon.

Why: a host with two cores and 128 connections each uploading 4 MiB
bodies has 128 threads that all want a CPU at once, copying into the
page cache. A small request's thread (a 4 KiB GET, OPTIONS, extents)
then wakes behind all of them, and again after each of its system
calls: on the UNIX socket its answer took 8-400 ms where ovirt-imageio,
whose direct writes sleep on the disk, took 2-3 ms
(bench/results/20261208-load.md). With turns, at most ``slots``
connections write at once and the others sleep; a small request never
takes one and waits behind a few writers, not all.

Rules that keep a turn from being hoarded:

- A turn is taken only for bytes already received: the connection waits
  for its client outside any turn, so a client that trickles its body
  holds none.
- Turns go in the order asked (FIFO), each handed straight to the next
  waiter on release: a writer that finishes one step and asks again
  goes behind the others, whose sockets filled meanwhile, so every turn
  moves a full step, and no writer starves.
- A turn lasts one step (at most a pipe or a buffer), never a request.

A turn may still wait on the storage itself (a slow disk, a hung NFS
server); turns bound the CPU, not the storage.

Where: bodies spliced from a plain socket to a file, whose threads
otherwise sleep on their sockets. Not TLS bodies: decrypting keeps
their threads runnable outside any turn, so a turn handed to one waits
for a CPU with it, and in the same benchmark turns around TLS writes
raised the small GET's p99 at 256 connections from 0.2 s to 2.2 s.
"""

from __future__ import annotations

import collections
import contextlib
import os
import threading
from collections.abc import Iterator


def default_slots() -> int:
    """One writer per CPU, at least two, so that one writer waiting on
    the storage leaves another running."""
    return max(2, os.cpu_count() or 1)


class Turns:
    """At most ``slots`` holders at once, served in the order they asked."""

    def __init__(self, slots: int) -> None:
        if slots < 1:
            raise ValueError(f"Turns need at least one slot, not {slots}")
        self.slots = slots
        self._free = slots
        self._mutex = threading.Lock()
        #: One locked lock per waiter, released to hand it the turn.
        self._waiters: collections.deque[threading.Lock] = \
            collections.deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    @contextlib.contextmanager
    def turn(self) -> Iterator[None]:
        """Hold a turn for the body of the ``with`` statement."""
        self._acquire()
        try:
            yield
        finally:
            self._release()

    def _acquire(self) -> None:
        with self._mutex:
            if self._free and not self._waiters:
                self._free -= 1
                return
            handed = threading.Lock()
            handed.acquire()
            self._waiters.append(handed)
        # Not interruptible: the releaser counts on this thread taking
        # the turn it hands over.
        handed.acquire()

    def _release(self) -> None:
        with self._mutex:
            if self._waiters:
                self._waiters.popleft().release()
            else:
                self._free += 1


#: The daemon's turns for writing request bodies to local storage.
STORAGE_WRITES = Turns(default_slots())
