"""Conformance: chunked PUT bodies (``Transfer-Encoding: chunked``).

Observed in ovirt-imageio 2.5.1: a chunked PUT is a 400 ("Content-Length
header is required"), writing nothing; a PUT with both Content-Length and
Transfer-Encoding is served by Content-Length, the Transfer-Encoding
ignored (the start of request smuggling). diskferry writes a chunked body
at its Content-Range offset, never past the range, and answers only once
the last chunk came; it refuses both headers together with 400. Each test
asserts both daemons' behaviour (docs/protocol.md).
"""

from __future__ import annotations

import os
import socket
import subprocess

import pytest

from servers import make_sparse_file

pytestmark = pytest.mark.all_storages

SIZE = 1 << 20
FILL = b"f"


@pytest.fixture
def image(tmp_path):
    return make_sparse_file(tmp_path / "image.raw", SIZE, {0: FILL * SIZE})


def read_file(path):
    with open(path, "rb") as f:
        return f.read()


def is_diskferry(endpoint):
    return endpoint.server.name == "diskferry"


def chunked(*chunks: bytes, trailers: bytes = b"") -> bytes:
    body = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks if c)
    return body + b"0\r\n" + trailers + b"\r\n"


def exchange(con, data: bytes, half_close=False):
    """Send ``data`` and read one answer; None when there is none.

    ovirt-imageio answers a chunked PUT 400 at once and closes, so sending
    the rest of the body, or reading the answer, may fail with a reset.
    """
    try:
        con.send(data)
    except OSError:
        pass
    try:
        if half_close:
            # Half-close the TCP or UNIX stream itself (for TLS, under the
            # TLS layer, so that an answer, if any, can still be read).
            socket.socket.shutdown(con.sock, socket.SHUT_WR)
        return con.response("PUT")
    except (ConnectionError, OSError, ValueError):
        return None


def refused(res):
    """ovirt-imageio's answer to a chunked PUT: 400, or a reset first."""
    return res is None or res.status == 400


def curl_target(endpoint, path):
    """curl's arguments to reach ``path`` through the endpoint's transport."""
    srv = endpoint.server
    if endpoint.transport == "tls":
        return ["--cacert", srv.ca_file, srv.url_base + path]
    if srv.local_socket.startswith("\0"):
        sock = ["--abstract-unix-socket", srv.local_socket[1:]]
    else:
        sock = ["--unix-socket", srv.local_socket]
    return sock + ["http://localhost" + path]


@pytest.mark.parametrize("offset", [0, 4096 + 3])
def test_curl_upload_from_pipe(endpoint, image, make_ticket, tmp_path, offset):
    """``curl -T -`` reads a pipe of unknown length: a chunked PUT."""
    t = make_ticket(endpoint.server, image, SIZE)
    data = os.urandom(300_000)
    source = tmp_path / "data"
    source.write_bytes(data)
    last = offset + len(data) - 1
    curl = subprocess.run(
        ["sh", "-c", 'cat "$0" | curl "$@"', str(source),
         "--silent", "--show-error", "--fail", "-T", "-",
         "-H", f"Content-Range: bytes {offset}-{last}/*",
         "--write-out", "%{http_code}",
         *curl_target(endpoint, f"/images/{t['uuid']}")],
        capture_output=True, timeout=60)
    out, err = curl.stdout, curl.stderr
    content = read_file(image)
    if is_diskferry(endpoint):
        assert curl.returncode == 0, err
        assert out == b"200"
        assert content[offset:last + 1] == data
        assert content[:offset] == FILL * offset
        assert content[last + 1:] == FILL * (SIZE - last - 1)
    else:
        # A 400 that curl may not get to read: ovirt-imageio closes the
        # connection while curl still sends.
        assert curl.returncode != 0
        assert content == FILL * SIZE


def test_chunks_extensions_trailers(endpoint, image, make_ticket):
    """Many chunks of odd sizes, chunk extensions and a trailer that
    names another range: the trailer is dropped, never obeyed."""
    t = make_ticket(endpoint.server, image, SIZE)
    parts = [os.urandom(n) for n in (1, 7, 4096, 65537, 3)]
    data = b"".join(parts)
    body = b"".join(b"%x;ext=1\r\n%s\r\n" % (len(p), p) for p in parts)
    body += b"0\r\nContent-Range: bytes 0-9/*\r\nX-Trailer: y\r\n\r\n"
    path = f"/images/{t['uuid']}"
    with endpoint.raw() as con:
        res = exchange(
            con,
            f"PUT {path}?flush=y HTTP/1.1\r\nHost: localhost\r\n"
            f"Transfer-Encoding: chunked\r\n"
            f"Content-Range: bytes 1000-{1000 + len(data) - 1}/*\r\n\r\n".encode()
            + body,
        )
        if is_diskferry(endpoint):
            # The connection stays in step after a chunked body.
            get = con.request("GET", path, {"Range": "bytes=1000-1000"})
            assert get.body == parts[0]
    content = read_file(image)
    if is_diskferry(endpoint):
        assert res.status == 200
        assert content == FILL * 1000 + data + FILL * (SIZE - 1000 - len(data))
    else:
        assert refused(res)
        assert content == FILL * SIZE


def test_expect_continue_chunked(endpoint, image, make_ticket):
    t = make_ticket(endpoint.server, image, SIZE)
    with endpoint.raw() as con:
        con.send(
            f"PUT /images/{t['uuid']} HTTP/1.1\r\nHost: localhost\r\n"
            "Transfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n".encode()
        )
        first = con.response("PUT")
        if is_diskferry(endpoint):
            assert first.status == 100
            con.send(chunked(b"abc"))
            assert con.response("PUT").status == 200
        else:
            assert first.status in (100, 400)
    expected = b"abc" if is_diskferry(endpoint) else FILL * 3
    assert read_file(image)[:4] == expected + FILL


@pytest.mark.parametrize("cut", ["in-size-line", "in-data", "before-last-chunk"])
def test_cut_body_never_acknowledged(endpoint, image, make_ticket, cut):
    """The peer stops sending (half-close) before the last chunk: no 200,
    and nothing written outside the range."""
    t = make_ticket(endpoint.server, image, SIZE)
    data = os.urandom(200_000)
    full = b"%x\r\n%s\r\n" % (len(data), data)
    partial = {
        "in-size-line": b"30d",
        "in-data": full[:100_000],
        "before-last-chunk": full,
    }[cut]
    with endpoint.raw() as con:
        res = exchange(
            con,
            f"PUT /images/{t['uuid']} HTTP/1.1\r\nHost: localhost\r\n"
            "Transfer-Encoding: chunked\r\n"
            f"Content-Range: bytes 4096-{4096 + len(data) - 1}/*\r\n\r\n".encode()
            + partial,
            half_close=True,
        )
    content = read_file(image)
    assert content[:4096] == FILL * 4096
    assert content[4096 + len(data):] == FILL * (SIZE - 4096 - len(data))
    if is_diskferry(endpoint):
        assert res is None
    else:
        assert refused(res)
        assert content == FILL * SIZE


DATA = bytes(range(256)) * 16  # 4096 bytes
OFFSET = 8192
RANGE = f"Content-Range: bytes {OFFSET}-{OFFSET + len(DATA) - 1}/*\r\n"

# (name, extra headers, body after the head, diskferry's status)
MALFORMED = [
    ("longer-than-range", RANGE, chunked(DATA, b"extra"), 400),
    ("shorter-than-range", RANGE, chunked(DATA[:-1]), 400),
    ("past-the-image", f"Content-Range: bytes {SIZE - 10}-{SIZE + 9}/*\r\n",
     chunked(b"x" * 20), 416),
    ("no-range-past-the-image", "", chunked(b"x" * SIZE, b"y"), 400),
    ("size-not-hex", RANGE, b"zz\r\n" + DATA, 400),
    ("size-negative", RANGE, b"-1\r\n" + DATA, 400),
    ("size-too-many-digits", RANGE, b"0" * 16 + b"1\r\nx\r\n0\r\n\r\n", 400),
    ("size-line-too-long", RANGE, b"1;" + b"e" * 2000 + b"\r\nx\r\n0\r\n\r\n", 400),
    ("size-line-bare-lf", RANGE, b"1000\n" + DATA + b"\r\n0\r\n\r\n", 400),
    ("data-without-crlf", RANGE, b"1000\r\n" + DATA + b"XX0\r\n\r\n", 400),
    ("too-many-trailers", RANGE,
     chunked(DATA, trailers=b"X-T: 1\r\n" * 101), 431),
]


@pytest.mark.parametrize("name,headers,body,status", MALFORMED,
                         ids=[m[0] for m in MALFORMED])
def test_malformed_chunked_refused(endpoint, image, make_ticket, name, headers,
                                   body, status):
    """Refused without an acknowledgement, and never a byte outside the
    range: diskferry with the status, closing the connection (the stream
    can no longer be framed); ovirt-imageio refuses every chunked body."""
    t = make_ticket(endpoint.server, image, SIZE)
    with endpoint.raw() as con:
        res = exchange(
            con,
            f"PUT /images/{t['uuid']} HTTP/1.1\r\nHost: localhost\r\n"
            f"Transfer-Encoding: chunked\r\n{headers}\r\n".encode() + body,
        )
        closed = res is not None and con.at_eof(timeout=5)
    content = read_file(image)
    if not is_diskferry(endpoint):
        assert refused(res)
        assert content == FILL * SIZE
        return
    assert res is not None and res.status == status, res
    assert closed
    if headers == RANGE:
        assert content[:OFFSET] == FILL * OFFSET
        assert content[OFFSET + len(DATA):] == FILL * (SIZE - OFFSET - len(DATA))
    else:
        # The range is the whole image: what came of the body may be
        # written, nothing past the image.
        assert len(content) == SIZE


@pytest.mark.parametrize("order", ["cl-te", "te-cl"])
def test_content_length_with_transfer_encoding(endpoint, image, make_ticket, order):
    """Both framings in one request: ovirt-imageio uses Content-Length and
    ignores Transfer-Encoding (writing the chunk framing as data);
    diskferry refuses it, 400, and closes."""
    t = make_ticket(endpoint.server, image, SIZE)
    body = chunked(b"abcd")
    lines = [f"Content-Length: {len(body)}", "Transfer-Encoding: chunked"]
    if order == "te-cl":
        lines.reverse()
    with endpoint.raw() as con:
        con.send(
            f"PUT /images/{t['uuid']}?flush=n HTTP/1.1\r\nHost: localhost\r\n"
            f"{lines[0]}\r\n{lines[1]}\r\n\r\n".encode() + body
        )
        res = con.response("PUT")
        closed = is_diskferry(endpoint) and con.at_eof(timeout=5)
    content = read_file(image)
    if is_diskferry(endpoint):
        assert res.status == 400
        assert closed
        assert content == FILL * SIZE
    else:
        assert res.status == 200
        assert content[: len(body)] == body


def test_chunked_keeps_connection(endpoint, image, make_ticket):
    """Several chunked PUTs and GETs on one connection."""
    t = make_ticket(endpoint.server, image, SIZE)
    path = f"/images/{t['uuid']}"
    if not is_diskferry(endpoint):
        with endpoint.raw() as con:
            res = exchange(
                con,
                f"PUT {path} HTTP/1.1\r\nHost: localhost\r\n"
                "Transfer-Encoding: chunked\r\n\r\n".encode() + chunked(b"a"),
            )
        assert refused(res)
        return
    with endpoint.raw() as con:
        for i in range(5):
            piece = bytes([65 + i]) * (1000 + i)
            con.send(
                f"PUT {path}?flush=n HTTP/1.1\r\nHost: localhost\r\n"
                "Transfer-Encoding: chunked\r\n"
                f"Content-Range: bytes {i * 5000}-{i * 5000 + len(piece) - 1}/*"
                "\r\n\r\n".encode() + chunked(piece[:500], piece[500:])
            )
            assert con.response("PUT").status == 200
            res = con.request(
                "GET", path, {"Range": f"bytes={i * 5000}-{i * 5000 + len(piece) - 1}"}
            )
            assert res.body == piece
        assert not con.at_eof(timeout=0.2)
