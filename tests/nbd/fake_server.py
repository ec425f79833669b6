"""A small scripted NBD server of our own, for what real servers never do.

It serves a memory export on a UNIX socket, one thread per connection,
with compact or extended headers, and lets a test replace the answer to
any request (``handler``) to send wrong magics, chunks outside the
request, truncated replies and the like. It is written from the
protocol document, independently of the client's code, so that the two
do not share mistakes: packing here uses plain ``struct`` calls.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x3E889045565A9

OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_GO = 1, 2, 3, 7
OPT_INFO, OPT_STRUCTURED, OPT_LIST_META, OPT_SET_META, OPT_EXTENDED = 6, 8, 9, 10, 11
REP_ACK, REP_INFO, REP_META = 1, 3, 4
ERR_UNSUP = 0x80000001

CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM = 0, 1, 2, 3, 4
CMD_WRITE_ZEROES, CMD_BLOCK_STATUS = 6, 7

T_NONE, T_DATA, T_HOLE, T_STATUS, T_STATUS_EXT = 0, 1, 2, 5, 6
T_ERROR, T_ERROR_OFFSET = 32769, 32770
DONE = 1

# Flags: HAS_FLAGS SEND_FLUSH SEND_FUA SEND_TRIM SEND_WRITE_ZEROES SEND_DF
# CAN_MULTI_CONN SEND_FAST_ZERO
DEFAULT_FLAGS = 1 | 4 | 8 | 32 | 64 | 128 | 256 | 2048

MiB = 1 << 20


@dataclass
class Req:
    flags: int
    type: int
    cookie: int
    offset: int
    length: int
    payload: bytes = b""


@dataclass
class Conn:
    sock: socket.socket
    server: FakeServer
    extended: bool = False
    structured: bool = False
    contexts: dict[int, str] = field(default_factory=dict)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            got = self.sock.recv(n - len(buf))
            if not got:
                raise EOFError
            buf += got
        return buf

    # Replies, in whichever header style was negotiated.

    def chunk(self, req: Req, flags: int, kind: int, payload: bytes = b"") -> None:
        if self.extended:
            head = struct.pack(
                ">IHHQQQ", 0x6E8A278C, flags, kind, req.cookie, req.offset, len(payload)
            )
        else:
            head = struct.pack(
                ">IHHQI", 0x668E33EF, flags, kind, req.cookie, len(payload)
            )
        self.send(head + payload)

    def simple(self, req: Req, error: int = 0, data: bytes = b"") -> None:
        self.send(struct.pack(">IIQ", 0x67446698, error, req.cookie) + data)

    def ok(self, req: Req) -> None:
        if self.extended:
            self.chunk(req, DONE, T_NONE)
        else:
            self.simple(req)

    def data(self, req: Req, offset: int, data: bytes, done: bool = True) -> None:
        self.chunk(req, DONE if done else 0, T_DATA, struct.pack(">Q", offset) + data)

    def hole(self, req: Req, offset: int, size: int, done: bool = True) -> None:
        self.chunk(req, DONE if done else 0, T_HOLE, struct.pack(">QI", offset, size))

    def error(
        self,
        req: Req,
        errno: int,
        message: str = "",
        done: bool = True,
        kind: int = T_ERROR,
        offset: int | None = None,
    ) -> None:
        msg = message.encode()
        payload = struct.pack(">IH", errno, len(msg)) + msg
        if offset is not None:
            payload += struct.pack(">Q", offset)
        self.chunk(req, DONE if done else 0, kind, payload)

    def status(
        self, req: Req, ctx: int, descs: list[tuple[int, int]], done: bool
    ) -> None:
        if self.extended:
            payload = struct.pack(">II", ctx, len(descs))
            payload += b"".join(struct.pack(">QQ", n, f) for n, f in descs)
            self.chunk(req, DONE if done else 0, T_STATUS_EXT, payload)
        else:
            payload = struct.pack(">I", ctx)
            payload += b"".join(struct.pack(">II", n, f) for n, f in descs)
            self.chunk(req, DONE if done else 0, T_STATUS, payload)

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


Handler = Callable[[Conn, Req], bool]


class FakeServer:
    """See the module docstring. ``handler(conn, req)`` returns True when it
    answered the request itself; otherwise the default answer is sent.
    ``statuses`` maps a context name to descriptors covering the export."""

    def __init__(
        self,
        path: Path,
        *,
        size: int = 4 * MiB,
        extended: bool = True,
        structured: bool = True,
        go: bool = True,
        no_zeroes: bool = True,
        block_size: tuple[int, int, int] | None = (1, 4096, 32 * MiB),
        flags: int = DEFAULT_FLAGS,
        contexts: tuple[str, ...] = ("base:allocation",),
        statuses: dict[str, list[tuple[int, int]]] | None = None,
        max_descriptors: int | None = None,
        option_errors: dict[int, tuple[int, str]] | None = None,
        greeting: bytes | None = None,
        handler: Handler | None = None,
    ) -> None:
        self.path = str(path)
        self.size = size
        self.mem = bytearray(size)
        self.extended_ok = extended
        self.structured_ok = structured
        self.go_ok = go
        self.no_zeroes = no_zeroes
        self.block_size = block_size
        self.flags = flags
        self.offered = contexts
        self.statuses = statuses or {"base:allocation": [(size, 0)]}
        self.max_descriptors = max_descriptors
        self.option_errors = option_errors or {}
        self.greeting = greeting
        self.handler = handler
        self.requests: list[Req] = []
        self.options: list[int] = []
        self.errors: list[BaseException] = []
        self._listener = socket.socket(socket.AF_UNIX)
        self._listener.bind(self.path)
        self._listener.listen(8)
        self._threads: list[threading.Thread] = []
        self._conns: list[Conn] = []
        self._stop = False
        self._accept = threading.Thread(target=self._accept_loop, daemon=True)
        self._accept.start()

    def close(self) -> None:
        self._stop = True
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        for c in self._conns:
            c.close()
        for t in self._threads:
            t.join(timeout=5)
        self._accept.join(timeout=5)
        if os.path.exists(self.path):
            os.unlink(self.path)

    def _accept_loop(self) -> None:
        while not self._stop:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            conn = Conn(sock, self)
            self._conns.append(conn)
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(t)
            t.start()

    def _serve(self, conn: Conn) -> None:
        try:
            if self._negotiate(conn):
                self._transmission(conn)
        except (EOFError, OSError):
            pass
        except BaseException as e:  # reported by tests through self.errors
            self.errors.append(e)
        finally:
            conn.close()

    # --- handshake

    def _reply(self, conn: Conn, opt: int, rep: int, data: bytes = b"") -> None:
        conn.send(struct.pack(">QIII", REPLY_MAGIC, opt, rep, len(data)) + data)

    def _negotiate(self, conn: Conn) -> bool:
        gflags = 1 | (2 if self.no_zeroes else 0)
        conn.send(self.greeting or struct.pack(">QQH", NBDMAGIC, IHAVEOPT, gflags))
        (cflags,) = struct.unpack(">I", conn.recv(4))
        zeroes = not cflags & 2
        while True:
            magic, opt, length = struct.unpack(">QII", conn.recv(16))
            assert magic == IHAVEOPT
            data = conn.recv(length)
            self.options.append(opt)
            if opt in self.option_errors:
                rep, msg = self.option_errors[opt]
                self._reply(conn, opt, rep, msg.encode())
                continue
            if opt == OPT_EXTENDED and self.extended_ok:
                conn.extended = True
                self._reply(conn, opt, REP_ACK)
            elif opt == OPT_STRUCTURED and self.structured_ok:
                conn.structured = True
                self._reply(conn, opt, REP_ACK)
            elif opt in (OPT_LIST_META, OPT_SET_META) and self.structured_ok:
                self._meta(conn, opt, data)
            elif opt in (OPT_GO, OPT_INFO) and self.go_ok:
                self._info(conn, opt)
                self._reply(conn, opt, REP_ACK)
                if opt == OPT_GO:
                    return True
            elif opt == OPT_EXPORT_NAME:
                reply = struct.pack(">QH", self.size, self.flags)
                conn.send(reply + (bytes(124) if zeroes else b""))
                return True
            elif opt == OPT_ABORT:
                self._reply(conn, opt, REP_ACK)
                return False
            else:
                self._reply(conn, opt, ERR_UNSUP, b"unsupported option")

    def _meta(self, conn: Conn, opt: int, data: bytes) -> None:
        (nlen,) = struct.unpack_from(">I", data)
        pos = 4 + nlen
        (count,) = struct.unpack_from(">I", data, pos)
        pos += 4
        queries = []
        for _ in range(count):
            (qlen,) = struct.unpack_from(">I", data, pos)
            queries.append(data[pos + 4 : pos + 4 + qlen].decode())
            pos += 4 + qlen
        if opt == OPT_SET_META:
            conn.contexts.clear()
        for i, name in enumerate(self.offered):
            wanted = any(
                q == name or (q.endswith(":") and name.startswith(q)) for q in queries
            )
            if wanted:
                ctx = 100 + i
                if opt == OPT_SET_META:
                    conn.contexts[ctx] = name
                self._reply(conn, opt, REP_META, struct.pack(">I", ctx) + name.encode())
        self._reply(conn, opt, REP_ACK)

    def _info(self, conn: Conn, opt: int) -> None:
        self._reply(conn, opt, REP_INFO, struct.pack(">HQH", 0, self.size, self.flags))
        if self.block_size is not None:
            self._reply(conn, opt, REP_INFO, struct.pack(">HIII", 3, *self.block_size))

    # --- transmission

    def _transmission(self, conn: Conn) -> None:
        while True:
            if conn.extended:
                magic, flags, kind, cookie, offset, length = struct.unpack(
                    ">IHHQQQ", conn.recv(32)
                )
                assert magic == 0x21E41C71, hex(magic)
                has_payload = bool(flags & 32)
            else:
                magic, flags, kind, cookie, offset, length = struct.unpack(
                    ">IHHQQI", conn.recv(28)
                )
                assert magic == 0x25609513, hex(magic)
                has_payload = kind == CMD_WRITE
            assert (kind == CMD_WRITE) == has_payload
            req = Req(flags, kind, cookie, offset, length)
            if has_payload:
                req.payload = conn.recv(length)
            self.requests.append(req)
            if kind == CMD_DISC:
                return
            if self.handler is not None and self.handler(conn, req):
                continue
            self.answer(conn, req)

    def answer(self, conn: Conn, req: Req) -> None:
        """The correct answer to a request."""
        end = req.offset + req.length
        if req.type == CMD_READ:
            data = bytes(self.mem[req.offset : end])
            if conn.structured or conn.extended:
                conn.data(req, req.offset, data)
            else:
                conn.simple(req, 0, data)
        elif req.type == CMD_WRITE:
            self.mem[req.offset : end] = req.payload
            conn.ok(req)
        elif req.type in (CMD_WRITE_ZEROES, CMD_TRIM):
            self.mem[req.offset : end] = bytes(req.length)
            conn.ok(req)
        elif req.type == CMD_FLUSH:
            conn.ok(req)
        elif req.type == CMD_BLOCK_STATUS:
            ids = sorted(conn.contexts)
            for n, ctx in enumerate(ids):
                descs = self.descriptors(conn.contexts[ctx], req.offset, req.length)
                conn.status(req, ctx, descs, done=n == len(ids) - 1)
        else:
            conn.error(req, 22, "unknown command")

    def descriptors(self, name: str, offset: int, length: int) -> list[tuple[int, int]]:
        """Descriptors from ``offset``: the first cut to start there, the
        last one whole (it may run past the request, as servers do)."""
        out = []
        pos = 0
        for n, f in self.statuses[name]:
            if pos + n > offset:
                start = max(pos, offset)
                out.append((pos + n - start, f))
                if pos + n >= offset + length:
                    break
            pos += n
            if self.max_descriptors and len(out) == self.max_descriptors:
                break
        return out
