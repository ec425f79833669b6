"""fallocate(2) with mode flags and the block-device zeroing ioctl.

``os.posix_fallocate`` offers only mode 0; punching holes and zeroing
ranges need the Linux flags, reached through libc with ctypes.
"""

import ctypes
import errno
import fcntl
import os
import struct

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

#: _IO(0x12, 127) from <linux/fs.h>: zero a byte range of a block device.
BLKZEROOUT = 0x127F

#: errnos meaning "this file system or device cannot do that": the caller
#: falls back to a slower way instead of failing the request.
UNSUPPORTED = frozenset({errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOTTY,
                         errno.EINVAL, errno.ENODEV, errno.ENOSYS})

#: The C library Python itself is linked with (dlopen(NULL)): no
#: ``ctypes.util.find_library``, which runs ``ldconfig -p`` in a child
#: process at every start of every command.
_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate64
_fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64,
                       ctypes.c_int64)
_fallocate.restype = ctypes.c_int


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def punch_hole(fd: int, offset: int, length: int) -> None:
    fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)


def zero_range(fd: int, offset: int, length: int) -> None:
    fallocate(fd, FALLOC_FL_ZERO_RANGE, offset, length)


def blkzeroout(fd: int, offset: int, length: int) -> None:
    fcntl.ioctl(fd, BLKZEROOUT, struct.pack("QQ", offset, length))
