"""A kernel pipe sized for splice(2), shared by the daemon and the client.

Moving a body socket -> pipe -> file with ``os.splice`` keeps its bytes
out of user space; the pipe's capacity bounds each step.
"""

import fcntl
import os

#: Capacity asked for: 1 MiB is the default unprivileged maximum
#: (/proc/sys/fs/pipe-max-size).
PIPE_SIZE = 1024 * 1024

#: Resize a pipe (Linux); the fcntl module has the name from Python 3.10
#: on some builds only.
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


class Pipe:
    """A pipe for bulk splicing; one per connection, reused.

    After a failed splice it may hold bytes of the failed transfer: close
    it rather than reuse it.
    """

    r: int | None
    w: int | None

    def __init__(self) -> None:
        self.r, self.w = os.pipe2(os.O_CLOEXEC)
        try:
            self.size = fcntl.fcntl(self.w, F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            self.size = 64 * 1024  # the kernel's default capacity

    def close_read(self) -> None:
        """Close the read end: a writer blocked on a full pipe gets EPIPE."""
        if self.r is not None:
            os.close(self.r)
            self.r = None

    def close_write(self) -> None:
        """Close the write end: a reader of an empty pipe gets end of file."""
        if self.w is not None:
            os.close(self.w)
            self.w = None

    def close(self) -> None:
        self.close_read()
        self.close_write()
