"""The local side of a copy: raw files and block devices.

A download into a regular file starts from a fresh sparse file of the
image's size (so ranges that are zero need no writing and holes stay
holes); a block device keeps its size and gets its zero ranges zeroed.
"""

from __future__ import annotations

import os
import stat
from collections import namedtuple

from diskferry import fallocate

#: A local image's name, as ``os.open`` takes it.
LocalPath = str | os.PathLike[str]

#: Zero-filled buffer for zeroing without an ioctl.
ZERO_CHUNK = 4 * 1024**2


class LocalImage(namedtuple("LocalImage", "fd size kind zeroed",
                            defaults=(False,))):
    """An open local raw image: ``fd``, ``size``, ``kind`` ("file",
    "block" or "other", a character device such as null) and ``zeroed``
    (every byte reads as zero now: a fresh sparse file)."""

    __slots__ = ()
    fd: int
    size: int
    kind: str
    zeroed: bool

    def close(self) -> None:
        os.close(self.fd)


def backing_path(image: LocalPath, backing: str) -> str:
    """Where the backing file an overlay ``image`` names lies: a relative
    name is relative to the overlay's folder, as qemu reads it from the
    overlay's header, not to the current folder."""
    return os.path.join(os.path.dirname(os.fsdecode(image)), backing)


def _kind(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISBLK(mode):
        return "block"
    return "other"


def open_source(path: LocalPath) -> LocalImage:
    """Open a raw file or block device for reading."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        kind = _kind(st.st_mode)
        if kind == "other":
            raise ValueError(f"{path}: not a regular file or block device")
        size = st.st_size if kind == "file" else os.lseek(fd, 0, os.SEEK_END)
    except BaseException:
        os.close(fd)
        raise
    return LocalImage(fd, size, kind)


def open_destination(path: LocalPath, size: int) -> LocalImage:
    """Open (creating if needed) where a download of ``size`` bytes goes.

    A regular file is truncated to a fresh sparse file of ``size``; a
    block device must be at least ``size`` bytes.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        st = os.fstat(fd)
        kind = _kind(st.st_mode)
        if kind == "file":
            os.ftruncate(fd, 0)
            os.ftruncate(fd, size)
            return LocalImage(fd, size, kind, zeroed=True)
        if kind == "block":
            dev_size = os.lseek(fd, 0, os.SEEK_END)
            if dev_size < size:
                raise ValueError(
                    f"{path}: device of {dev_size} bytes is smaller than "
                    f"the image ({size} bytes)")
            return LocalImage(fd, size, kind)
        return LocalImage(fd, size, kind, zeroed=True)
    except BaseException:
        os.close(fd)
        raise


def open_existing(path: LocalPath, size: int) -> LocalImage:
    """Open the ``.part`` file of an interrupted download to continue it:
    kept as it is, and it must have the image's size."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size != size:
            raise ValueError(
                f"{path}: not a partial download of this image (it has "
                f"{st.st_size} bytes, the image {size})")
        return LocalImage(fd, size, "file")
    except BaseException:
        os.close(fd)
        raise


def punch_hole(image: LocalImage, offset: int, length: int) -> None:
    """Make a range of a regular file read as zeros, deallocated where the
    file system can."""
    try:
        fallocate.punch_hole(image.fd, offset, length)
    except OSError as e:
        if e.errno not in fallocate.UNSUPPORTED:
            raise
        zero_range(image, offset, length)


def zero_range(image: LocalImage, offset: int, length: int) -> None:
    """Make ``[offset, offset+length)`` of a local image read as zeros."""
    if image.kind == "block":
        try:
            fallocate.blkzeroout(image.fd, offset, length)
            return
        except OSError:
            pass
    zeros = bytes(min(length, ZERO_CHUNK))
    end = offset + length
    while offset < end:
        offset += os.pwrite(image.fd, zeros[:end - offset], offset)
