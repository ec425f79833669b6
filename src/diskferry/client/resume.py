"""What an interrupted raw download had safely written: its journal.

A download into ``NAME`` writes ``NAME.part`` and, beside it,
``NAME.part.done``: a header line naming the image size, then one line
``START END`` per range of the image that is in the ``.part`` file *and
on disk*. A range is appended only after ``fdatasync`` of the ``.part``
returned, and the journal is fsynced after each append, so whatever the
journal names survived any crash or kill that followed; a line torn by a
crash in the middle of an append is ignored (its range is fetched
again). ``--resume`` reads the journal and fetches only what it does not
name.

Why a journal rather than comparing the ``.part`` with the server:
the images API has no per-block checksum (``/checksum`` is one digest
of the whole image), and a range that reads as data locally may still be
half written. Recording what was synced is exact, costs one small write
every ``CHECKPOINT_INTERVAL`` seconds, and needs nothing from the server.
It assumes the image did not change between the two runs, as any resume
does; ``--verify`` checks the result against the server's checksum.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterable, Iterator

from diskferry.client import extents as _extents
from diskferry.extent import Extent

SUFFIX = ".done"
FORMAT_VERSION = 1
#: Seconds between two syncs of the .part file and the journal: at most
#: this much work is lost when the client is killed.
CHECKPOINT_INTERVAL = 2.0


class ResumeError(ValueError):
    """The .part file cannot be resumed (another image, a damaged journal)."""


def journal_path(part: str) -> str:
    return part + SUFFIX


class Journal:
    """The journal of one ``.part`` file: ranges recorded by any worker
    thread, written out at checkpoints after the data is synced."""

    def __init__(self, part: str, size: int, done: list[tuple[int, int]],
                 fd: int) -> None:
        self.part = part
        self.size = size
        #: Ranges on disk when the download started (sorted, merged).
        self.done = done
        self._fd = fd
        self._data_fd = -1
        self._pending: list[tuple[int, int]] = []
        self._lock = threading.Lock()
        self._writing = threading.Lock()
        self._stop = threading.Event()
        self._checkpoints: threading.Thread | None = None

    @classmethod
    def create(cls, part: str, size: int) -> Journal:
        """A new, empty journal (a stale one is replaced)."""
        path = journal_path(part)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
                     0o644)
        header = {"diskferry-download": FORMAT_VERSION, "size": size}
        os.write(fd, (json.dumps(header) + "\n").encode())
        os.fsync(fd)
        _sync_dir(path)
        return cls(part, size, [], fd)

    @classmethod
    def load(cls, part: str, size: int) -> Journal:
        """The journal of an interrupted download of ``size`` bytes."""
        path = journal_path(part)
        try:
            with open(path, "rb") as f:
                lines = f.read().split(b"\n")
        except FileNotFoundError:
            raise ResumeError(f"{part} has no journal ({path}): nothing "
                              f"says what it holds") from None
        header = _header(lines[0], path)
        if header.get("size") != size:
            raise ResumeError(
                f"{part} is part of a download of {header.get('size')} "
                f"bytes; this image has {size}: it is another image")
        done: list[tuple[int, int]] = []
        # The last element follows the last newline: empty, or a line
        # torn by a crash, cut off so that appends start on a new line.
        for line in lines[1:-1]:
            done.append(_range(line, size, path))
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        if lines[-1]:
            os.ftruncate(fd, sum(len(line) + 1 for line in lines[:-1]))
        return cls(part, size, _merge(done), fd)

    def attach(self, data_fd: int) -> None:
        """The .part file's descriptor: from now on a thread syncs it and
        writes the journal every ``CHECKPOINT_INTERVAL`` seconds, so that
        no worker waits for the disk."""
        self._data_fd = data_fd
        self._checkpoints = threading.Thread(
            target=self._run, name="diskferry-journal", daemon=True)
        self._checkpoints.start()

    def record(self, start: int, end: int) -> None:
        """``[start, end)`` is written to the .part (not yet synced)."""
        if end > start:
            with self._lock:
                self._pending.append((start, end))

    def checkpoint(self) -> None:
        """Sync the .part, then append what it held before the sync."""
        with self._writing:
            with self._lock:
                ready, self._pending = self._pending, []
            if not ready or self._data_fd < 0:
                return
            # Every range in ``ready`` was written before this sync began.
            os.fdatasync(self._data_fd)
            text = "".join(f"{s} {e}\n" for s, e in _merge(ready))
            os.write(self._fd, text.encode())
            os.fsync(self._fd)

    def _run(self) -> None:
        while not self._stop.wait(CHECKPOINT_INTERVAL):
            try:
                self.checkpoint()
            except OSError:
                # The copy reports its own I/O errors; the ranges of this
                # checkpoint go unrecorded, so a resume fetches them again.
                return

    def close(self) -> None:
        self._stop.set()
        if self._checkpoints is not None:
            self._checkpoints.join()
            self._checkpoints = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def remove(self) -> None:
        self.close()
        try:
            os.unlink(journal_path(self.part))
        except FileNotFoundError:
            pass


def remaining(extents: Iterable[Extent],
              done: list[tuple[int, int]]) -> Iterator[Extent]:
    """The parts of ``extents`` that ranges ``done`` do not cover, lazily."""
    for ext in extents:
        if not done:
            yield ext
            continue
        gaps = _extents.subtract(
            [(ext.start, ext.end)], done)
        for start, end in gaps:
            yield ext._replace(start=start, length=end - start)


def done_bytes(done: list[tuple[int, int]]) -> int:
    return sum(end - start for start, end in done)


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(end, out[-1][1]))
        else:
            out.append((start, end))
    return out


def _header(line: bytes, path: str) -> dict[str, object]:
    try:
        header = json.loads(line)
    except ValueError:
        header = None
    if not isinstance(header, dict) or \
            header.get("diskferry-download") != FORMAT_VERSION:
        raise ResumeError(f"{path} is not a diskferry download journal")
    return header


def _range(line: bytes, size: int, path: str) -> tuple[int, int]:
    try:
        start, end = (int(x) for x in line.split())
    except ValueError:
        raise ResumeError(f"{path}: damaged line {line[:40]!r}") from None
    if not 0 <= start < end <= size:
        raise ResumeError(f"{path}: range {start}-{end} outside the image")
    return start, end


def _sync_dir(path: str) -> None:
    fd = os.open(os.path.dirname(os.path.abspath(path)),
                 os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
