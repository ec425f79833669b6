"""Listening sockets for the three services: TCP, UNIX pathname, abstract.

TLS is never wrapped on the listening socket (one silent client would
stall every accept); the server wraps each accepted socket in its own
thread.
"""

import errno
import os
import socket
import stat

from diskferry.sockaddr import display_address, is_abstract, kernel_address

#: Pending connections the kernel queues per listener. Clients open
#: dozens of connections at once on the local socket (parallel imports and
#: backups); the kernel caps this at net.core.somaxconn (4096 by default).
LISTEN_BACKLOG = 1024

#: Seconds to wait for a process to accept a probe connection on a socket
#: file before binding over it. A live daemon's kernel accepts at once
#: (the backlog, not the daemon, answers); a full backlog answers EAGAIN.
PROBE_TIMEOUT = 1.0


def tcp_listener(host: str, port: int) -> socket.socket:
    """A listening TCP socket; "" or "::" listen on every address."""
    addr: tuple[str, int] | tuple[str, int, int, int]
    if host in ("", "::"):
        family, addr = socket.AF_INET6, ("::", port)
    else:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                  flags=socket.AI_PASSIVE)
        family, _, _, _, addr = info[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and host in ("", "::"):
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(addr)
        sock.listen(LISTEN_BACKLOG)
    except BaseException:
        sock.close()
        raise
    return sock


def unix_listener(address: str, mode: int | None = None) -> socket.socket:
    """A listening UNIX stream socket, abstract or at a path.

    A socket file at the path is removed first only if it is stale (no
    process answers on it); a live one, or a path holding anything else,
    is refused: OSError EADDRINUSE or EEXIST, with the file left alone.
    """
    address = kernel_address(address)
    if not is_abstract(address):
        remove_stale_socket(address)
        os.makedirs(os.path.dirname(os.path.abspath(address)), exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(address)
    except BaseException:
        sock.close()
        raise
    try:
        # chmod before listen, so that no client connects while the mode
        # is the umask's.
        if mode is not None and not is_abstract(address):
            os.chmod(address, mode)
        sock.listen(LISTEN_BACKLOG)
    except BaseException:
        sock.close()
        if not is_abstract(address):
            os.unlink(address)  # ours: bound a moment ago
        raise
    return sock


def remove_stale_socket(path: str) -> None:
    """Remove the socket file at ``path`` if nothing listens on it.

    A daemon killed without cleanup leaves its socket file behind; a
    connect to it is refused. A connect that succeeds (or finds the
    backlog full) means a live process owns the path: removing the file
    would cut it off from every future client, so this refuses instead.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(errno.EEXIST, "exists and is not a socket",
                              path)
    if socket_answers(path):
        raise OSError(errno.EADDRINUSE, "a process answers on it", path)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def socket_answers(path: str) -> bool:
    """True if a process accepts connections on the UNIX socket ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(PROBE_TIMEOUT)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            return False
        except (BlockingIOError, TimeoutError):
            return True
        return True


def describe(sock: socket.socket) -> str:
    """A printable address: host:port, a path, or @name when abstract."""
    addr = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        return display_address(addr)
    host, port = addr[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
