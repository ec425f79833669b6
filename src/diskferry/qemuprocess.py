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
import socket
import struct
import subprocess
import time

#: <sys/prctl.h>
_PR_SET_PDEATHSIG = 1

#: What an NBD server sends first, once it serves.
NBD_GREETING = b"NBDMAGIC"

# The newstyle handshake (the NBD protocol): the server's greeting, the
# client's flags and option, the server's option reply.
_HANDSHAKE = struct.Struct(">8s8sH")
_ABORT = struct.Struct(">I8sII")
_IHAVEOPT = b"IHAVEOPT"
_OPT_ABORT = 2
#: NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES.
_CLIENT_FLAGS = 0x3
_REPLY_SIZE = 20
#: ``struct ucred``: pid, uid, gid.
_PEERCRED = struct.Struct("3i")


def die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM when the thread that
    started it dies (SIGTERM, so that qemu-nbd flushes and removes its
    socket)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def blockdev_filename(spec: dict[str, object]) -> str:
    """The ``json:`` filename of a blockdev tree (compact, one line)."""
    return "json:" + json.dumps(spec, separators=(",", ":"))


def wait_serving(proc: subprocess.Popen[bytes], socket_path: str,
                 timeout: float) -> bool:
    """Until the NBD server ``proc`` greets a client on ``socket_path``:
    True then, False if it ended first, ``TimeoutError`` after ``timeout``
    seconds. qemu-nbd binds its socket before it opens the image, so a
    connection alone proves nothing: the image may still fail to open
    (locked by a VM, a backing file missing)."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        if greets(socket_path, deadline - time.monotonic()):
            return True
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"qemu-nbd did not listen within {timeout:.0f} s")
        time.sleep(0.005)
    return False


def greets(socket_path: str, timeout: float) -> bool:
    """Whether an NBD server on ``socket_path`` sends its greeting. The
    connection then ends the way the protocol says (``NBD_OPT_ABORT``),
    so that qemu-nbd logs no failed negotiation: its log is what names
    its death."""
    return server_pid(socket_path, timeout) is not None


def server_pid(socket_path: str, timeout: float) -> int | None:
    """The process of the NBD server that greets a client on
    ``socket_path`` (the kernel's ``SO_PEERCRED``: the process that
    listens), or None if none does; the connection ends as ``greets``
    ends it."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(max(timeout, 0.001))
        try:
            s.connect(socket_path)
            greeting = s.recv(_HANDSHAKE.size, socket.MSG_WAITALL)
            if len(greeting) != _HANDSHAKE.size:
                return None
            magic, _, flags = _HANDSHAKE.unpack(greeting)
            if magic != NBD_GREETING:
                return None
            s.sendall(_ABORT.pack(flags & _CLIENT_FLAGS, _IHAVEOPT,
                                  _OPT_ABORT, 0))
            s.recv(_REPLY_SIZE, socket.MSG_WAITALL)  # its ack, or EOF
            pid, _, _ = _PEERCRED.unpack(s.getsockopt(
                socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
            return int(pid)
        except OSError:
            return None


def log_message(path: str) -> str:
    """What a qemu program wrote to its log ``path``, on one line, without
    its name ("" when there is no log)."""
    try:
        with open(path, "rb") as f:
            text = f.read()[-4000:].decode("utf-8", "replace")
    except OSError:
        return ""
    return "; ".join(line.removeprefix("qemu-nbd: ").strip()
                     for line in text.splitlines() if line.strip())
