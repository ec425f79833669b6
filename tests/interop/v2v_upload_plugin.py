"""An nbdkit plugin that writes an NBD client's requests into a transfer
URL, the way virt-v2v's ``-o rhv-upload`` output feeds an oVirt disk.

    qemu-img convert / nbdcopy --NBD--> nbdkit python THIS url=... size=...
        --OPTIONS (TLS)--> daemon: features, max_writers, unix_socket
        --PUT / PATCH over a pool of keep-alive connections--> daemon

Written from the images API alone (docs/protocol.md), for the tests: an
NBD write is a ``PUT ?flush=n`` with ``Content-Range``, a write-zeroes or
a trim a ``PATCH {"op": "zero"}``, a flush a ``PATCH {"op": "flush"}``
on every connection of the pool (older servers flushed one connection's
writes only). The pool moves to the daemon's UNIX socket when OPTIONS
advertises one, as a client on the daemon's host does; otherwise it
stays on HTTPS. It runs in nbdkit's embedded Python, so it uses the
standard library only.

Parameters: ``url`` (the transfer URL), ``size`` (the disk's virtual
size, the ticket's), ``cafile`` (the CA of the daemon's certificate),
``connections`` (the pool's size at most; 4 by default).
"""

from __future__ import annotations

import http.client
import json
import queue
import socket
import ssl
import threading
from urllib.parse import urlsplit

import nbdkit

API_VERSION = 2

#: Seconds a request may wait on the daemon before the NBD request fails.
TIMEOUT = 60.0

#: Connections kept to the daemon when no ``connections`` is given:
#: enough for qemu-img's 8 coroutines to overlap their requests.
DEFAULT_CONNECTIONS = 4

params = {"cafile": None, "connections": str(DEFAULT_CONNECTIONS)}
server = {}
pool = queue.Queue()
flush_lock = threading.Lock()


class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over a UNIX socket (a path, or an abstract name starting with
    NUL, as ``unix_socket`` gives it)."""

    def __init__(self, address, timeout):
        super().__init__("localhost", timeout=timeout)
        self.address = address

    def connect(self):
        """A socket that fails to connect is closed with the connection
        (``send`` closes it on any error)."""
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.address)


def config(key, value):
    if key not in ("url", "size", "cafile", "connections"):
        raise RuntimeError(f"unknown parameter {key!r}")
    params[key] = value


def config_complete():
    for key in ("url", "size"):
        if key not in params:
            raise RuntimeError(f"missing parameter {key}=")
    if urlsplit(params["url"]).scheme != "https":
        raise RuntimeError(f"url must be https: {params['url']!r}")
    params["size"] = nbdkit.parse_size(params["size"])


def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL


def https_connection():
    url = urlsplit(params["url"])
    context = ssl.create_default_context(cafile=params["cafile"])
    return http.client.HTTPSConnection(url.hostname, url.port or 443,
                                       timeout=TIMEOUT, context=context)


def after_fork():
    """Ask the daemon what it offers (over HTTPS: the transfer URL), then
    open the pool, on its UNIX socket when it has one."""
    con = https_connection()
    try:
        res = send(con, "OPTIONS", "", expect=(200,))
        answer = json.loads(res)
    finally:
        con.close()
    server["features"] = set(answer.get("features", ()))
    address = answer.get("unix_socket")
    count = max(min(int(params["connections"]), answer.get("max_writers", 1)), 1)
    server["connections"] = count
    for _ in range(count):
        if address:
            pool.put(UnixHTTPConnection(address, TIMEOUT))
        else:
            pool.put(https_connection())
    nbdkit.debug(f"pool of {pool.qsize()} connections to "
                 f"{'unix socket' if address else 'https'}")


def cleanup():
    while not pool.empty():
        pool.get_nowait().close()


def send(con, method, query, body=None, headers=None, expect=(200,)):
    """One request on a kept-alive connection; the answer's body. A failed
    request closes the connection: the next one opens it again."""
    path = urlsplit(params["url"]).path + query
    try:
        con.request(method, path, body=body, headers=headers or {})
        res = con.getresponse()
        data = res.read()
    except (OSError, http.client.HTTPException):
        con.close()
        raise
    if res.status not in expect:
        con.close()
        raise RuntimeError(f"{method} {path}: {res.status} {data[:200]!r}")
    return data


class Borrowed:
    """A connection of the pool for one request."""

    def __enter__(self):
        self.con = pool.get()
        return self.con

    def __exit__(self, *exc):
        pool.put(self.con)


def patch(con, message):
    body = json.dumps(message).encode()
    send(con, "PATCH", "", body=body,
         headers={"Content-Type": "application/json"})


def open(readonly):
    return {"readonly": readonly}


def get_size(h):
    return params["size"]


def can_write(h):
    return True


def can_zero(h):
    return "zero" in server["features"]


def can_trim(h):
    return "zero" in server["features"]


def can_flush(h):
    return "flush" in server["features"]


def can_fua(h):
    return nbdkit.FUA_NATIVE if can_flush(h) else nbdkit.FUA_NONE


def can_multi_conn(h):
    """Every NBD connection shares the pool, and a flush flushes it all."""
    return True


def pread(h, buf, offset, flags):
    end = offset + len(buf) - 1
    with Borrowed() as con:
        data = send(con, "GET", "", headers={"Range": f"bytes={offset}-{end}"},
                    expect=(206,))
    if len(data) != len(buf):
        raise RuntimeError(f"GET {offset}-{end}: {len(data)} bytes")
    buf[:] = data


def pwrite(h, buf, offset, flags):
    fua = flags & nbdkit.FLAG_FUA
    headers = {"Content-Range": f"bytes {offset}-{offset + len(buf) - 1}/*",
               "Content-Length": str(len(buf))}
    with Borrowed() as con:
        send(con, "PUT", "?flush=" + ("y" if fua else "n"), body=buf,
             headers=headers)


def zero(h, count, offset, flags):
    fua = bool(flags & nbdkit.FLAG_FUA)
    with Borrowed() as con:
        patch(con, {"op": "zero", "offset": offset, "size": count,
                    "flush": fua})


def trim(h, count, offset, flags):
    """A trimmed range reads as zeros afterwards: the daemon deallocates
    it where the ticket is sparse."""
    zero(h, count, offset, flags)


def flush(h, flags):
    """Flush on every connection of the pool, each once: one flush at a
    time gathers them, so two flushes never wait on each other."""
    with flush_lock:
        taken = [pool.get() for _ in range(server["connections"])]
        try:
            for con in taken:
                patch(con, {"op": "flush"})
        finally:
            for con in taken:
                pool.put(con)
