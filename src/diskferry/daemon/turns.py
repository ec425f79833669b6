"""Turns at the CPU for receiving upload bodies, shared by the daemon.

Why: a host with two cores and 128 connections each uploading 4 MiB
bodies has 128 threads that all want a CPU at once (copying into the
page cache, or decrypting TLS). A small request's thread (a 4 KiB GET,
OPTIONS, extents) then wakes behind all of them, and again after each
of its system calls: its answer took 8-400 ms on the UNIX socket where
ovirt-imageio, whose direct writes sleep on the disk, took 2-3 ms
(bench/results/20261208-load.md). With turns, at most ``slots`` uploads
use a CPU at once and the others sleep; a small request takes no turn
and waits behind a few uploads, not all.

What a turn covers, on each path (``handlers/datapath.py``):

- a body spliced from a plain socket to a file: adding to the pipe what
  came while the step waited, and writing the pipe to the file;
- a TLS body: decrypting the records already received (its write to
  storage is outside: in one turn with the decrypting, a turn waited
  longer than the write took, and the GET's p99 rose).

Rules that keep a turn from being hoarded:

- A turn is taken only for bytes already received: a connection waits
  for its client outside any turn, so a client that trickles its body
  holds none.
- Turns go in the order asked (FIFO), each handed straight to the next
  waiter on release: an upload that finishes one step and asks again
  goes behind the others, whose sockets filled meanwhile, so every turn
  moves a full step and no upload starves.
- A turn moves one step, never a request: at most a pipe (1 MiB) of a
  spliced body, 256 KiB of a TLS body. Turns are fair by count, not by
  bytes, and a TCP socket's buffer grows with what its reader takes: a
  larger step let a few TLS uploads take whole bodies per turn while
  others took 64 KiB.

A spliced step's turn may still wait on the storage (a slow disk, a hung
NFS server); turns bound the CPU, not the storage.
"""

from __future__ import annotations

import collections
import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import TypeAlias

#: What takes a turn for the body of a ``with`` statement (``Turns.turn``,
#: or ``contextlib.nullcontext`` for none); its value is true if the turn
#: was waited for.
Turn: TypeAlias = Callable[[], AbstractContextManager[object]]


def default_slots() -> int:
    """One upload per CPU, at least two, so that one waiting on the
    storage leaves another running."""
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
    def turn(self) -> Iterator[bool]:
        """Hold a turn for the body of the ``with`` statement; ``as``
        gives True if it had to wait for it (more may have come in the
        meantime)."""
        waited = self._acquire()
        try:
            yield waited
        finally:
            self._release()

    def _acquire(self) -> bool:
        with self._mutex:
            if self._free and not self._waiters:
                self._free -= 1
                return False
            handed = threading.Lock()
            handed.acquire()
            self._waiters.append(handed)
        handed.acquire()
        return True

    def _release(self) -> None:
        with self._mutex:
            if self._waiters:
                self._waiters.popleft().release()
            else:
                self._free += 1


#: The daemon's turns for receiving upload bodies.
UPLOADS = Turns(default_slots())
