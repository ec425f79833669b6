"""The file backend: regular files and block devices.

Buffered I/O by default, except reads into a buffer (the TLS path),
which are direct where the file system allows it: copying out of the
page cache takes CPU that TLS needs (figures in docs/design.md). Reads
the kernel moves itself (sendfile, splice) use the page cache. With
``direct=True`` writes are direct too and nothing uses the page cache
(right for shared storage). Direct I/O needs aligned offsets, lengths
and memory: the
aligned middle of a request goes through the ``O_DIRECT`` descriptor and
an unaligned head or tail through a second, buffered descriptor of the
same file. Linux keeps the two coherent (a direct write invalidates the
cached pages it overlaps) and ``fdatasync`` on either flushes the file.

Zeroing, from cheapest to most general:

    sparse ticket, file     punch a hole (the range is deallocated)
    file                    fallocate ZERO_RANGE (stays allocated)
    block device            BLKZEROOUT (the device may unmap)
    anything else           write zeros
"""

import ctypes
import errno
import functools
import logging
import mmap
import os
import stat
import urllib.parse
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from diskferry import fallocate
from diskferry.daemon.backends.base import (
    ALL_FEATURES,
    Backend,
    BackendKind,
    Extent,
    ZeroCopyFile,
)
from diskferry.errors import BackendError, NotAvailable
from diskferry.extent import file_extents
from diskferry.fileio import preadv_full, pwrite_all

if TYPE_CHECKING:
    from diskferry.daemon.config import Config
    from diskferry.daemon.tickets import Ticket

log = logging.getLogger("diskferry.daemon.backends.file")

#: Alignment of offsets, lengths and memory for O_DIRECT; 4096 satisfies
#: every logical block size in use (512 and 4096). Buffers from
#: ``aligned_buffer`` are aligned to it.
DIRECT_ALIGNMENT = 4096

#: ``FileBackend._read_fd`` before the first read into a buffer.
_UNOPENED: Final = -1

#: Largest single write of zeros when nothing faster works.
ZERO_CHUNK = 8 * 1024**2

#: A positional read or write that finishes (``fileio``): descriptor,
#: buffer, offset; returns the bytes moved.
PositionalIO = Callable[[int, memoryview, int], int]


@functools.cache
def _zero_buffer() -> mmap.mmap:
    """Zeros to write when nothing faster works; shared, never written."""
    return mmap.mmap(-1, ZERO_CHUNK)


def check_url(url: urllib.parse.SplitResult) -> None:
    if not url.path.startswith("/"):
        raise ValueError(f"{url.geturl()!r} is not an absolute file:// URL")


def open_file(ticket: "Ticket", config: "Config") -> "FileBackend":
    """The ticket's file, with the ``[backend_file]`` configuration."""
    section = config.backend_file
    return FileBackend(urllib.parse.unquote(urllib.parse.urlsplit(
                           ticket.spec.url).path),
                       writable="write" in ticket.spec.ops,
                       direct=section.direct, sparse=ticket.spec.sparse,
                       buffer_size=section.buffer_size,
                       max_writers=section.max_writers)


class FileBackend:
    """A regular file or block device, open for one connection."""

    #: Connections that may read at once. Writers: ``max_writers`` for a
    #: regular file (one unless configured), as many as readers for a
    #: block device, as ovirt-imageio answers. Writers of distinct ranges
    #: are safe in both modes: a direct write's unaligned edges go through
    #: the page cache, so no block is ever read, modified and written back
    #: by two connections.
    max_readers = 8
    max_writers: int
    features = ALL_FEATURES
    remote = False
    #: A file is opened for writing when its ticket allows it.
    writable = True

    def __init__(self, path: str, *, writable: bool = False,
                 direct: bool = False, sparse: bool = False,
                 buffer_size: int = 8 * 1024**2, max_writers: int = 1
                 ) -> None:
        self.path = path
        self.buffer_size = buffer_size
        self.direct = direct
        self.sparse = sparse
        flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC
        self._direct_fd: int | None = None
        self._read_fd: int | None = None
        fd = self._open_checked(path, flags)
        #: None once closed.
        self._fd: int | None = fd
        try:
            self.is_block = stat.S_ISBLK(os.fstat(fd).st_mode)
            self.max_writers = self.max_readers if self.is_block \
                else max_writers
            self._size = os.lseek(fd, 0, os.SEEK_END)
            if direct:
                self._direct_fd = self._open_direct(path, flags)
                self.direct = self._direct_fd is not None
            #: Where reads into a buffer go: direct even when writes are
            #: not; opened on the first such read (a connection that only
            #: splices never needs it).
            self._read_fd = self._direct_fd if direct else _UNOPENED
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _open_checked(path: str, flags: int) -> int:
        """A descriptor of a regular file or block device.

        Opened non-blocking, so that a FIFO (or a device that waits for a
        peer) fails at once instead of holding the connection's thread
        until a writer comes; blocking again once checked.
        """
        try:
            fd = os.open(path, flags | os.O_NONBLOCK)
        except OSError as e:
            raise BackendError(f"Cannot open {path}: {e.strerror}") from e
        try:
            mode = os.fstat(fd).st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
                raise BackendError(
                    f"{path} is neither a regular file nor a block device")
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        return fd

    @staticmethod
    def _open_direct(path: str, flags: int, quiet: bool = False
                     ) -> int | None:
        """An O_DIRECT descriptor, or None where the file system has none."""
        try:
            fd = os.open(path, flags | os.O_DIRECT | os.O_NONBLOCK)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            if not quiet:
                log.warning("%s: O_DIRECT not supported here, using "
                            "buffered I/O", path)
            return None
        os.set_blocking(fd, True)
        return fd

    @property
    def _file(self) -> int:
        """The file's descriptor; a closed backend has none."""
        if self._fd is None:
            raise BackendError(f"{self.path} is closed")
        return self._fd

    def size(self) -> int:
        """The size now: a file may shrink or grow while a ticket lives."""
        if self.is_block:
            return self._size
        return os.fstat(self._file).st_size

    def fileno(self) -> int | None:
        """The descriptor sendfile may use: none in direct mode, as the
        kernel would read through the page cache direct mode avoids."""
        return None if self.direct else self._file

    # Reading and writing

    def readinto(self, buf: memoryview, offset: int) -> int:
        if self._read_fd == _UNOPENED:
            self._read_fd = self._open_direct(
                self.path, os.O_RDONLY | os.O_CLOEXEC, quiet=True)
        if self._read_fd is None:
            return preadv_full(self._file, buf, offset)
        try:
            return self._direct_io(preadv_full, self._read_fd, offset, buf)
        except OSError as e:
            if e.errno != errno.EINVAL or self.direct:
                raise
            # A file system that opens with O_DIRECT but refuses the read.
            log.warning("%s: O_DIRECT reads refused, using buffered I/O",
                        self.path)
            os.close(self._read_fd)
            self._read_fd = None
            return preadv_full(self._file, buf, offset)

    def write(self, data: memoryview, offset: int) -> int:
        if self._direct_fd is None:
            return pwrite_all(self._file, data, offset)
        return self._direct_io(pwrite_all, self._direct_fd, offset, data)

    def _direct_io(self, io: PositionalIO, direct_fd: int, offset: int,
                   buf: memoryview) -> int:
        """Run ``io`` on the aligned middle through ``direct_fd``, the rest
        buffered.

        ``buf`` must come from ``aligned_buffer`` for the middle part to be
        aligned in memory; its start moves with the unaligned head.
        """
        fd = self._file
        length = len(buf)
        head = -offset % DIRECT_ALIGNMENT
        if head >= length:
            return io(fd, buf, offset)
        done = 0
        if head:
            done = io(fd, buf[:head], offset)
            if done < head:
                return done
        middle = (length - head) // DIRECT_ALIGNMENT * DIRECT_ALIGNMENT
        view = buf[head:head + middle]
        if middle and _address_aligned(view):
            done += io(direct_fd, view, offset + head)
        elif middle:
            done += io(fd, view, offset + head)
        if done < head + middle:
            return done
        if done < length:
            done += io(fd, buf[done:], offset + done)
        return done

    # Zeroing and flushing

    def zero(self, offset: int, length: int, punch_hole: bool) -> None:
        if length == 0:
            return
        if self.is_block:
            if self._try(fallocate.blkzeroout, offset, length):
                return
        else:
            if (punch_hole and
                    self._try(fallocate.punch_hole, offset, length)):
                return
            if self._try(fallocate.zero_range, offset, length):
                return
        self._write_zeros(offset, length)

    def _try(self, func: Callable[[int, int, int], object], offset: int,
             length: int) -> bool:
        try:
            func(self._file, offset, length)
        except OSError as e:
            if e.errno in fallocate.UNSUPPORTED:
                return False
            raise
        return True

    def _write_zeros(self, offset: int, length: int) -> None:
        zeros = memoryview(_zero_buffer())
        end = offset + length
        while offset < end:
            n = min(end - offset, len(zeros))
            self.write(zeros[:n], offset)
            offset += n

    def flush(self) -> None:
        """fdatasync: every write to the file, from every connection."""
        os.fdatasync(self._file)

    # Extents

    def extents(self, start: int, length: int) -> list[Extent]:
        """Data and hole extents of ``[start, start+length)``.

        Regular files use SEEK_DATA/SEEK_HOLE, one syscall per extent; a
        block device is reported as one data extent.
        """
        end = min(start + length, self.size())
        if start >= end:
            return []
        if self.is_block:
            return [Extent(start, end - start, zero=False)]
        return file_extents(self._file, start, end)

    def dirty_extents(self, start: int, length: int) -> list[Extent]:
        raise NotAvailable(f"{self.path} has no dirty bitmap")

    def close(self) -> None:
        """Close every descriptor once; safe on a half-opened backend."""
        read_fd, self._read_fd = self._read_fd, None
        direct_fd, self._direct_fd = self._direct_fd, None
        fd, self._fd = self._fd, None
        if read_fd is not None and read_fd not in (_UNOPENED, direct_fd):
            os.close(read_fd)
        for owned in (direct_fd, fd):
            if owned is not None:
                os.close(owned)


def _address_aligned(view: memoryview) -> bool:
    try:
        address = ctypes.addressof(ctypes.c_char.from_buffer(view))
    except TypeError:  # read-only memory; cannot tell, take the safe path
        return False
    return address % DIRECT_ALIGNMENT == 0


KIND = BackendKind(check_url=check_url, open=open_file)

if TYPE_CHECKING:
    # mypy checks FileBackend against each protocol it claims.
    _backend: type[Backend] = FileBackend
    _zero_copy: type[ZeroCopyFile] = FileBackend
