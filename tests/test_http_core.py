"""The HTTP core on a socket pair: no listener, no port, no daemon.

One end is a raw client that writes bytes; the other is a server
``Connection`` served by ``exchange.serve_request`` in a thread with a
small application, as the server runs it per connection. The tests say
what goes on the wire: keep-alive, pipelining, framing errors and when
the connection closes.
"""

from __future__ import annotations

import errno
import socket
import threading
import time
from dataclasses import dataclass

import pytest

from diskferry.daemon.http import parse
from diskferry.daemon.http.accesslog import SecretPaths
from diskferry.daemon.http.connection import Connection
from diskferry.daemon.http.exchange import (
    MAX_DISCARDED_BODY,
    Outcome,
    serve_request,
)
from diskferry.daemon.http.request import Request
from diskferry.errors import (
    BadRequest,
    StorageLost,
    request_error,
    storage_error,
)

TIMEOUT = 5.0


@dataclass
class State:
    id: str
    idle_timeout: float | None = None


class EchoApp:
    """``/echo`` answers the body it read; ``/ignore`` answers without
    reading it; ``/refuse`` raises a 400 without reading it; ``/full``
    and ``/lost`` fail a write after reading a little of the body (a
    full disk, a storage gone); ``/fail`` breaks."""

    secret_paths = SecretPaths()

    def connection_opened(self, conn_id: str) -> State:
        return State(conn_id)

    def connection_closed(self, context: State) -> None:
        pass

    def handle(self, request: Request[State]) -> None:
        conn = request.conn
        if request.path == "/echo":
            body = bytearray()
            buf = memoryview(bytearray(7))  # several reads per body
            while n := conn.readinto(buf):
                body += buf[:n]
            request.log.size = len(body)
            conn.send_response(200, bytes(body))
        elif request.path == "/ignore":
            conn.send_response(200, b"ignored")
        elif request.path == "/refuse":
            raise BadRequest("Refused")
        elif request.path == "/full":
            conn.readinto(memoryview(bytearray(3)))
            error = OSError(errno.ENOSPC, "No space left on device")
            raise storage_error(error, "Writing") from error
        elif request.path == "/lost":
            conn.readinto(memoryview(bytearray(3)))
            raise request_error(StorageLost("export gone"))
        else:
            raise RuntimeError("secret internals")


class Pair:
    """A client socket and the server end, served in a thread."""

    def __init__(self, idle: float = TIMEOUT,
                 head_timeout: float = TIMEOUT) -> None:
        self.client, server = socket.socketpair()
        self.client.settimeout(TIMEOUT)
        self.reader = self.client.makefile("rb")
        self.conn = Connection(server, timeout=idle, head_timeout=head_timeout)
        self.outcomes: list[Outcome] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        app = EchoApp()
        context = app.connection_opened("pair/1")
        try:
            while True:
                outcome = serve_request(self.conn, app, context, "local")
                if outcome is None:
                    break
                self.outcomes.append(outcome)
                if not outcome.keep:
                    break
        finally:
            self.conn.close()

    def send(self, data: bytes) -> None:
        self.client.sendall(data)

    def response(self) -> tuple[int, dict[str, str], bytes]:
        """The next response: status, headers (lower-case names), body."""
        status_line = self.reader.readline()
        assert status_line, "connection closed"
        status = int(status_line.split(b" ")[1])
        headers = {}
        while (line := self.reader.readline()) != b"\r\n":
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.lower()] = value.strip()
        body = self.reader.read(int(headers["content-length"]))
        return status, headers, body

    def served(self, count: int) -> list[Outcome]:
        """The outcomes, once ``count`` requests were served (a request's
        outcome is recorded after its answer was sent)."""
        deadline = time.monotonic() + TIMEOUT
        while len(self.outcomes) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.outcomes

    def closed(self) -> bool:
        """True when the server closed its end (after all it sent)."""
        self.thread.join(TIMEOUT)
        return self.reader.read() == b"" and not self.thread.is_alive()

    def close(self) -> None:
        self.reader.close()
        self.client.close()
        self.thread.join(TIMEOUT)


@pytest.fixture
def pair():
    p = Pair()
    yield p
    p.close()


def req(method: str, path: str, body: bytes = b"", *headers: str,
        version: str = "HTTP/1.1", length: bool = True) -> bytes:
    lines = [f"{method} {path} {version}", "Host: pair", *headers]
    if length and body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


# Keep-alive and pipelining


def test_keep_alive_serves_requests_one_after_another(pair):
    for body in (b"first", b"second", b""):
        pair.send(req("PUT", "/echo", body))
        assert pair.response()[::2] == (200, body)
    outcomes = pair.served(3)
    assert [o.keep for o in outcomes] == [True] * 3
    assert [o.record.size for o in outcomes] == [5, 6, 0]


def test_pipelined_requests_in_one_send_answered_in_order(pair):
    pair.send(req("PUT", "/echo", b"one") + req("PUT", "/echo", b"two") +
              req("GET", "/ignore"))
    assert pair.response()[::2] == (200, b"one")
    assert pair.response()[::2] == (200, b"two")
    assert pair.response()[::2] == (200, b"ignored")
    pair.send(req("PUT", "/echo", b"after"))
    assert pair.response()[::2] == (200, b"after")


def test_pipelined_chunked_body_then_request(pair):
    chunked = (b"PUT /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-Trailer: y\r\n\r\n")
    pair.send(chunked + req("PUT", "/echo", b"next"))
    assert pair.response()[::2] == (200, b"hello world")
    assert pair.response()[::2] == (200, b"next")


def test_head_answer_has_no_body(pair):
    pair.send(req("HEAD", "/ignore") + req("PUT", "/echo", b"x"))
    status_line = pair.reader.readline()
    assert status_line.startswith(b"HTTP/1.1 200 ")
    while pair.reader.readline() != b"\r\n":
        pass
    # The next bytes are the next response, not a body.
    assert pair.response()[::2] == (200, b"x")


# Expect: 100-continue


def test_expect_continue_answered_when_the_body_is_read(pair):
    pair.send(req("PUT", "/echo", b"", "Expect: 100-continue",
                  "Content-Length: 4"))
    assert pair.reader.readline() == b"HTTP/1.1 100 Continue\r\n"
    assert pair.reader.readline() == b"\r\n"
    pair.send(b"body")
    assert pair.response()[::2] == (200, b"body")


def test_expect_continue_refused_closes_without_100(pair):
    pair.send(req("PUT", "/refuse", b"", "Expect: 100-continue",
                  "Content-Length: 4"))
    status, headers, _ = pair.response()
    assert (status, headers["connection"]) == (400, "close")
    assert pair.closed()


# Framing errors: 400 (or the limit's status), and the connection closes


@pytest.mark.parametrize("head", [
    b"PUT /echo HTTP/1.1\r\nContent-Length: abc\r\n\r\n",
    b"PUT /echo HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
    b"PUT /echo HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    b"PUT /echo HTTP/1.1\r\nContent-Length: 3\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n",
    b"PUT /echo HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
    b"GET /echo HTTP/9.9\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
], ids=["cl-not-a-number", "cl-negative", "cl-conflicting", "cl-and-te",
        "te-gzip", "version", "tls-hello"])
def test_bad_framing_is_400_and_closes(pair, head):
    pair.send(head)
    status, headers, _ = pair.response()
    assert (status, headers["connection"]) == (400, "close")
    assert pair.closed()
    [outcome] = pair.outcomes
    assert outcome.head is None and not outcome.keep and outcome.cause


@pytest.mark.parametrize("chunks", [
    b"zz\r\nhello\r\n0\r\n\r\n",
    b"-5\r\nhello\r\n0\r\n\r\n",
    b"1" * 16 + b"\r\n",
    b"5\r\nhelloXX0\r\n\r\n",
    b"5" + b" " * parse.MAX_CHUNK_LINE + b"\r\n",
], ids=["not-hex", "sign", "too-many-digits", "no-crlf-after-data",
        "line-too-long"])
def test_bad_chunks_are_400_and_close(pair, chunks):
    pair.send(b"PUT /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" +
              chunks)
    status, headers, _ = pair.response()
    assert (status, headers["connection"]) == (400, "close")
    assert pair.closed()


def test_long_request_line_is_414_and_closes(pair):
    pair.send(b"GET /" + b"a" * parse.MAX_REQUEST_LINE + b" HTTP/1.1\r\n\r\n")
    status, headers, _ = pair.response()
    assert (status, headers["connection"]) == (414, "close")
    assert pair.closed()


def test_oversized_head_is_431_and_closes(pair):
    line = b"X-Filler: " + b"f" * 200 + b"\r\n"
    # No blank line: the limit applies while the head is still coming.
    pair.send(b"GET /ignore HTTP/1.1\r\n" +
              line * (parse.MAX_HEAD // len(line) + 1))
    status, headers, _ = pair.response()
    assert (status, headers["connection"]) == (431, "close")
    assert pair.closed()


def test_too_many_header_lines_is_431_and_closes(pair):
    pair.send(req("GET", "/ignore", b"",
                  *[f"X-{i}: y" for i in range(parse.MAX_HEADERS + 1)]))
    status, headers, _ = pair.response()
    assert (status, headers["connection"]) == (431, "close")
    assert pair.closed()


def test_short_body_then_close_is_not_answered(pair):
    pair.send(req("PUT", "/echo", b"", "Content-Length: 10") + b"short")
    pair.client.shutdown(socket.SHUT_WR)
    assert pair.closed()
    assert pair.outcomes[0].cause.startswith("connection lost: ")


# Close rules


def test_connection_close_closes_after_the_answer(pair):
    pair.send(req("PUT", "/echo", b"last", "Connection: close"))
    assert pair.response()[::2] == (200, b"last")
    assert pair.closed()


def test_http_1_0_closes_unless_keep_alive(pair):
    pair.send(req("PUT", "/echo", b"kept", "Connection: keep-alive",
                  version="HTTP/1.0"))
    assert pair.response()[::2] == (200, b"kept")
    pair.send(req("PUT", "/echo", b"last", version="HTTP/1.0"))
    assert pair.response()[::2] == (200, b"last")
    assert pair.closed()


def test_answer_without_reading_the_body_closes(pair):
    pair.send(req("PUT", "/ignore", b"unread body"))
    assert pair.response()[::2] == (200, b"ignored")
    assert pair.closed()


def test_small_refused_body_is_drained_and_the_connection_kept(pair):
    pair.send(req("PUT", "/refuse", b"x" * 1000) + req("PUT", "/echo", b"ok"))
    status, headers, body = pair.response()
    assert (status, body) == (400, b"Refused\n")
    assert "connection" not in headers
    assert pair.response()[::2] == (200, b"ok")


def test_large_refused_body_closes_unread(pair):
    body = b"x" * (MAX_DISCARDED_BODY + 1)
    pair.send(req("PUT", "/refuse", b"", f"Content-Length: {len(body)}"))
    status, headers, _ = pair.response()
    assert (status, headers["connection"]) == (400, "close")
    assert pair.closed()


def test_refused_chunked_body_closes(pair):
    pair.send(b"PUT /refuse HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
              b"1\r\nx\r\n0\r\n\r\n")
    status, headers, _ = pair.response()
    assert (status, headers["connection"]) == (400, "close")
    assert pair.closed()


def test_failed_write_drains_a_chunked_body_and_keeps(pair):
    pair.send(b"PUT /full HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
              + b"2000\r\n" + b"x" * 0x2000 + b"\r\n0\r\n\r\n"
              + req("PUT", "/echo", b"next"))
    status, headers, body = pair.response()
    assert (status, body) == (507, b"Writing failed: No space left on "
                                    b"device\n")
    assert "connection" not in headers
    assert pair.response()[::2] == (200, b"next")


def test_storage_lost_drains_the_body_then_closes(pair):
    """The client sends its whole body (more than the socket buffers
    hold) and reads the 500: the body was drained before the answer."""
    body = b"x" * (4 << 20)
    pair.send(req("PUT", "/lost", b"", f"Content-Length: {len(body)}")
              + body)
    status, headers, data = pair.response()
    assert (status, headers["connection"]) == (500, "close")
    assert b"storage went away" in data
    assert pair.closed()


def test_handler_failure_is_500_without_internals_and_closes(pair):
    pair.send(req("GET", "/fail"))
    status, headers, body = pair.response()
    assert (status, headers["connection"]) == (500, "close")
    assert b"secret" not in body
    assert pair.closed()
    assert pair.outcomes[0].cause == "internal error: RuntimeError"


def test_peer_closing_between_requests_ends_quietly(pair):
    pair.send(req("PUT", "/echo", b"one"))
    assert pair.response()[::2] == (200, b"one")
    pair.client.shutdown(socket.SHUT_WR)
    assert pair.closed()
    assert len(pair.outcomes) == 1


# Timeouts


def test_idle_connection_closes_quietly():
    p = Pair(idle=0.2)
    try:
        pair_served = p.closed()
        assert pair_served and p.outcomes == []
    finally:
        p.close()


def test_head_trickled_past_its_deadline_is_408_and_closes():
    p = Pair(idle=1.0, head_timeout=0.3)
    try:
        # The first head's deadline runs from the connection's start;
        # each byte restarts the idle timeout, never the deadline.
        for byte in b"GET /":
            p.send(bytes([byte]))
            time.sleep(0.04)
        status, headers, _ = p.response()
        assert (status, headers["connection"]) == (408, "close")
        assert p.closed()
        [outcome] = p.outcomes
        assert outcome.head is None
        assert outcome.cause.startswith("Request head not received within")
    finally:
        p.close()


def test_head_deadline_runs_from_the_first_byte_of_a_later_request():
    p = Pair(idle=1.0, head_timeout=0.5)
    try:
        p.send(req("PUT", "/echo", b"one"))
        assert p.response()[::2] == (200, b"one")
        time.sleep(0.6)  # idle, not past a deadline: none runs yet
        p.send(req("PUT", "/echo", b"two"))
        assert p.response()[::2] == (200, b"two")
    finally:
        p.close()
