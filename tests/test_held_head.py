"""A small answer over TLS goes in one write: head and body together.

Under load, every system call a request makes is one more wait for the
GIL when it returns; a small ranged GET's head waits for its body and
both go in one TLS record. Real TLS on a socket pair; the server's
socket class counts its ``sendall`` calls (``SSLContext.sslsocket_class``).
"""

from __future__ import annotations

import socket
import ssl
import threading

import pytest

import servers
from diskferry.daemon.http.connection import HELD_HEAD_BODY, Connection


class CountingSocket(ssl.SSLSocket):
    """An SSLSocket that keeps what each sendall call sent."""

    sent: list[bytes]

    def sendall(self, data: bytes, flags: int = 0) -> None:
        self.sent.append(bytes(data))
        return super().sendall(data, flags)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return servers.make_pki(tmp_path_factory.mktemp("pki"))


def _answer(pki, respond) -> tuple[list[bytes], bytes]:
    """Serve ``respond(conn)`` on a TLS socket pair; what the server's
    sendall calls sent and what the client read."""
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(pki.cert_file, pki.key_file)
    server_ctx.sslsocket_class = CountingSocket
    client_ctx = ssl.create_default_context(cafile=pki.ca_file)
    a, b = socket.socketpair()
    sent: list[bytes] = []

    def serve() -> None:
        with server_ctx.wrap_socket(a, server_side=True) as tls:
            tls.sent = sent
            respond(Connection(tls, tls=True))

    thread = threading.Thread(target=serve)
    thread.start()
    received = b""
    with client_ctx.wrap_socket(b, server_hostname="localhost") as client:
        client.settimeout(10)
        while data := client.recv(1 << 20):
            received += data
    thread.join()
    return sent, received


def _get_answer(length: int):
    body = bytes(range(256)) * (length // 256)

    def respond(conn: Connection) -> None:
        conn.start_response(206, len(body), {"Content-Range": "x"})
        for i in range(0, len(body), 128 * 1024):
            conn.write(body[i:i + 128 * 1024])

    return body, respond


@pytest.mark.parametrize("length", [4096, HELD_HEAD_BODY])
def test_small_body_goes_with_its_head_in_one_write(pki, length):
    body, respond = _get_answer(length)
    sent, received = _answer(pki, respond)
    assert len(sent) == 1
    assert sent[0].startswith(b"HTTP/1.1 206 Partial Content\r\n")
    assert sent[0].endswith(b"\r\n\r\n" + body)
    assert received == sent[0]


def test_large_body_is_not_copied_behind_its_head(pki):
    body, respond = _get_answer(HELD_HEAD_BODY + 4096)
    sent, received = _answer(pki, respond)
    assert sent[0].endswith(b"\r\n\r\n")
    assert b"".join(sent[1:]) == body
    assert received == b"".join(sent)


def test_answer_to_head_is_sent_at_once(pki):
    def respond(conn: Connection) -> None:
        conn.no_body = True
        conn.start_response(200, 4096)

    sent, received = _answer(pki, respond)
    assert len(sent) == 1 and received == sent[0]
    assert b"Content-Length: 4096\r\n" in received


def test_empty_body_is_sent_at_once(pki):
    sent, received = _answer(pki, lambda conn: conn.start_response(200, 0))
    assert len(sent) == 1 and received.startswith(b"HTTP/1.1 200 OK")


def test_plain_socket_sends_the_head_at_once():
    a, b = socket.socketpair()
    with a, b:
        conn = Connection(a)
        conn.start_response(206, 4096)
        b.settimeout(10)
        head = b.recv(65536)
        assert head.startswith(b"HTTP/1.1 206") and head.endswith(b"\r\n\r\n")
