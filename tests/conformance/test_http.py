"""Conformance: HTTP behaviour common to every resource.

Observed in ovirt-imageio 2.5.1 beyond PROTOCOL.md:

- 414 (request line longer than 64 KiB) and 431 (a header line longer
  than 64 KiB, or more than 100 headers) come from Python's
  http.server with a ``text/html`` body and ``Connection: close``; the
  application's own errors are ``text/plain``.  Both servers are held to
  the status, ``Content-Length`` and the close; ``text/plain`` for these
  two is checked on diskferry only (PROTOCOL.md: every error body is
  text/plain).
- A header line without a colon is ignored (the request succeeds).
- POST, DELETE and TRACE on an image are 405 with a text/plain
  body (an unknown method such as ``STORE`` is 405 too, where diskferry
  answers 501: docs/protocol.md). HEAD is 405 too, where diskferry
  answers it (test_head.py).
- Any method ovirt-imageio does not serve is a 405 that keeps the
  connection, whatever its characters (``NO_SUCH_METHO``, ``get``, even
  ``GE@T`` that is not an RFC 9110 token); diskferry answers a token 501
  and a malformed method 400, closing the connection (docs/protocol.md).
- A ``Content-Length`` of thousands of digits is a 400, on the images and
  the control services.
- ``GET /images/`` (no ticket id) is a 400, and so are
  ``/images//extents`` and ``/images//checksum``; an unknown path is a
  404.
- The images service does not serve ``/tickets/`` (404).
"""

from __future__ import annotations

import ssl

import pytest

from servers import make_sparse_file

pytestmark = pytest.mark.all_storages

SIZE = 1 << 20


@pytest.fixture
def image(tmp_path):
    return make_sparse_file(tmp_path / "image.raw", SIZE, {0: b"k" * SIZE})


def test_keep_alive_many_requests(endpoint, image, make_ticket):
    t = make_ticket(endpoint.server, image, SIZE)
    path = f"/images/{t['uuid']}"
    with endpoint.raw() as con:
        for i in range(60):
            kind = i % 5
            if kind == 0:
                res = con.request("OPTIONS", path)
                assert res.status == 200
            elif kind == 1:
                res = con.request("GET", path, {"Range": f"bytes={i}-{i + 99}"})
                assert res.status == 206
                assert res.body == b"k" * 100
            elif kind == 2:
                res = con.request(
                    "PUT",
                    f"{path}?flush=n",
                    {"Content-Range": f"bytes {i * 100}-{i * 100 + 99}/*"},
                    b"p" * 100,
                )
                assert res.status == 200
            elif kind == 3:
                res = con.request("GET", f"{path}/extents")
                assert res.status == 200
            else:
                res = con.request(
                    "PATCH",
                    path,
                    {"Content-Type": "application/json"},
                    b'{"op": "flush"}',
                )
                assert res.status == 200
            assert (res.header("Connection") or "").lower() != "close"
        # Still the same connection and still open.
        assert not con.at_eof(timeout=0.2)


def test_keep_alive_after_client_errors(endpoint, image, make_ticket):
    """Errors that do not concern the ticket leave the connection usable."""
    t = make_ticket(endpoint.server, image, SIZE)
    path = f"/images/{t['uuid']}"
    with endpoint.raw() as con:
        assert con.request("GET", path, {"Range": "bytes=0-1,3-4"}).status == 416
        assert con.request("GET", f"{path}/extents?context=dirty").status == 404
        res = con.request(
            "PATCH", path, {"Content-Type": "application/json"}, b'{"op": "x"}'
        )
        assert res.status == 400
        assert con.request("GET", path, {"Range": "bytes=0-0"}).status == 206


def test_http_1_0_request(endpoint, image, make_ticket):
    t = make_ticket(endpoint.server, image, SIZE, ops=["read"])
    with endpoint.raw() as con:
        con.send(f"GET /images/{t['uuid']} HTTP/1.0\r\n\r\n".encode())
        res = con.response()
    assert res.status == 200
    assert len(res.body) == SIZE


def test_unused_headers_ignored(endpoint, image, make_ticket):
    t = make_ticket(endpoint.server, image, SIZE, ops=["read"])
    headers = {
        "Authorization": "Bearer not-a-real-token",
        "User-Agent": "conformance-test/1.0",
        "Accept-Encoding": "gzip, deflate",
        "X-Custom": "whatever",
        "Cookie": "a=b",
    }
    with endpoint.raw() as con:
        res = con.request(
            "GET", f"/images/{t['uuid']}", dict(headers, Range="bytes=0-9")
        )
        assert res.status == 206
        assert res.body == b"k" * 10
        assert res.header("Content-Encoding") is None
        assert con.request("OPTIONS", f"/images/{t['uuid']}", headers).status == 200


def test_content_length_on_every_response(endpoint, image, make_ticket):
    rw = make_ticket(endpoint.server, image, SIZE)["uuid"]
    ro = make_ticket(endpoint.server, image, SIZE, ops=["read"])["uuid"]
    json_ct = {"Content-Type": "application/json"}
    requests = [
        ("OPTIONS", f"/images/{rw}", {}, b"", 200),
        ("OPTIONS", "/images/*", {}, b"", 200),
        ("GET", f"/images/{rw}", {"Range": "bytes=0-9"}, b"", 206),
        ("GET", f"/images/{rw}", {"Range": f"bytes={SIZE}-{SIZE + 1}"}, b"", 416),
        ("PUT", f"/images/{rw}?flush=n", {}, b"abc", 200),
        ("PATCH", f"/images/{rw}", json_ct, b'{"op": "flush"}', 200),
        ("PATCH", f"/images/{rw}", json_ct, b'{"op": "nope"}', 400),
        ("GET", f"/images/{rw}/extents", {}, b"", 200),
        ("GET", f"/images/{rw}/extents?context=dirty", {}, b"", 404),
        ("GET", f"/images/{rw}/checksum", {}, b"", 200),
        ("GET", f"/images/{rw}/checksum/algorithms", {}, b"", 200),
        ("POST", f"/images/{rw}", {}, b"", 405),
        ("GET", "/no-such-resource", {}, b"", 404),
        ("PUT", f"/images/{ro}", {}, b"abc", 403),
    ]
    for method, path, headers, body, status in requests:
        with endpoint.raw() as con:
            res = con.request(method, path, headers, body)
        assert res.status == status, (method, path, res.body)
        length = res.header("Content-Length")
        assert length is not None, (method, path)
        assert int(length) == len(res.body), (method, path)
    # The control service too, 204 included.
    for method, path, body, status in [
        ("GET", f"/tickets/{rw}", None, 200),
        ("PATCH", f"/tickets/{rw}", {"timeout": 300}, 200),
        ("GET", "/tickets/no-such-ticket", None, 404),
        ("DELETE", "/tickets/no-such-ticket", None, 204),
        ("DELETE", f"/tickets/{ro}", None, 204),
    ]:
        got, headers, data = endpoint.server.control(method, path, body)
        assert got == status
        assert headers["Content-Length"] == str(len(data)), (method, path)


@pytest.mark.parametrize(
    "method,path",
    [
        ("GET", "/no-such-resource"),
        ("GET", "/tickets/{id}"),
        ("POST", "/images/{id}"),
        ("DELETE", "/images/{id}"),
        ("TRACE", "/images/{id}"),
    ],
)
def test_error_statuses(endpoint, image, make_ticket, method, path):
    t = make_ticket(endpoint.server, image, SIZE)
    expected = 404 if path.startswith(("/no-such", "/tickets")) else 405
    with endpoint.raw() as con:
        res = con.request(method, path.format(id=t["uuid"]))
        assert res.status == expected
        assert res.header("Content-Type").startswith("text/plain")
        assert res.header("Content-Length") is not None
        if method != "HEAD":
            assert int(res.header("Content-Length")) == len(res.body) > 0


@pytest.mark.parametrize("method", ["PUT", "PATCH"])
def test_content_length_over_4300_digits_400(endpoint, method):
    """Past CPython's int() limit: a 500 had the ValueError escaped."""
    with endpoint.raw() as con:
        con.send(
            f"{method} /images/x HTTP/1.1\r\nHost: a\r\n"
            f"Content-Length: {'9' * 5000}\r\n\r\n".encode()
        )
        res = con.response()
    assert res.status == 400
    assert res.header("Content-Type").startswith("text/plain")
    assert b"Content-Length" in res.body


@pytest.mark.parametrize("path", ["/images/no-such-ticket", "/info/"])
@pytest.mark.parametrize(
    "method", ["NO_SUCH_METHO", "STORE", "get", "M-1", "!#$%&'*+-.^_`|~"]
)
def test_method_token_not_implemented(endpoint, method, path):
    """RFC 9110 9.1: any token is a method; one the server does not
    implement is a 501, and the connection goes on."""
    expected = 501 if endpoint.server.name == "diskferry" else 405
    with endpoint.raw() as con:
        res = con.request(method, path)
        assert res.status == expected, res.body
        assert res.header("Content-Type").startswith("text/plain")
        assert method.encode() in res.body
        assert con.request("OPTIONS", "/images/*").status == 200


@pytest.mark.parametrize("method", ["GE@T", "GET,", "G(T", "[GET]"])
def test_method_not_a_token(endpoint, method):
    """A method with a character no token has: the request line cannot be
    trusted, so diskferry answers 400 and closes."""
    with endpoint.raw() as con:
        res = con.request(method, "/images/no-such-ticket")
        assert res.header("Content-Type").startswith("text/plain")
        assert method.encode() in res.body
        if endpoint.server.name == "diskferry":
            assert res.status == 400
            assert b"Malformed method" in res.body
            assert con.at_eof()
        else:
            assert res.status == 405
            assert con.request("OPTIONS", "/images/*").status == 200


def test_images_without_ticket_id_400(endpoint):
    with endpoint.raw() as con:
        res = con.request("GET", "/images/")
    assert res.status == 400
    assert res.header("Content-Type").startswith("text/plain")


@pytest.mark.parametrize("path", ["/images//extents", "/images//checksum"])
def test_ticket_resource_without_ticket_id_400(endpoint, path):
    with endpoint.raw() as con:
        res = con.request("GET", path)
        assert res.status == 400
        assert b"Ticket id is required" in res.body
        assert con.request("PUT", path).status == 405


def test_checksum_algorithms_without_ticket_id(endpoint):
    """The algorithms do not depend on a ticket; ovirt-imageio answers
    them under an empty id too."""
    with endpoint.raw() as con:
        res = con.request("GET", "/images//checksum/algorithms")
    assert res.status == 200
    assert "blake2b" in res.json()["algorithms"]


def huge_request_line():
    return b"GET /images/" + b"a" * 70000 + b" HTTP/1.1\r\nHost: localhost\r\n\r\n"


def huge_header_line():
    return (
        b"GET /images/x/extents HTTP/1.1\r\nHost: localhost\r\nX-Big: "
        + b"b" * 70000
        + b"\r\n\r\n"
    )


def many_headers():
    return (
        b"GET /images/x/extents HTTP/1.1\r\nHost: localhost\r\n"
        + b"".join(b"X-H%d: %d\r\n" % (i, i) for i in range(200))
        + b"\r\n"
    )


LIMITS = [
    (huge_request_line, 414),
    (huge_header_line, 431),
    (many_headers, 431),
]


@pytest.mark.parametrize(
    "make,status", LIMITS, ids=["request-line", "header-line", "header-count"]
)
def test_request_limits(endpoint, make, status):
    with endpoint.raw() as con:
        try:
            con.send(make())
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
            # The server may answer and close before reading everything.
            pass
        res = con.response()
        assert res.status == status
        assert int(res.header("Content-Length")) == len(res.body)
        assert con.at_eof()
    # The daemon goes on serving.
    with endpoint.raw() as con:
        assert con.request("OPTIONS", "/images/*").status == 200


@pytest.mark.parametrize("kind", ["diskferry"])
@pytest.mark.parametrize(
    "make,status", LIMITS, ids=["request-line", "header-line", "header-count"]
)
def test_ext_request_limits_text_plain(daemons, kind, make, status):
    import servers

    srv = daemons.get(kind)
    with servers.RawConnection(srv.raw_remote_socket()) as con:
        try:
            con.send(make())
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
            # The server may answer and close before reading everything.
            pass
        res = con.response()
    assert res.status == status
    assert res.header("Content-Type").startswith("text/plain")


def test_small_requests_answered_promptly(endpoint, image, make_ticket):
    """Small requests on a keep-alive connection are not held back by TCP
    small-packet delays (a response written in pieces without TCP_NODELAY
    waits for the client's delayed ACK, about 40 ms per request)."""
    import time

    t = make_ticket(endpoint.server, image, SIZE)
    path = f"/images/{t['uuid']}"
    with endpoint.raw() as con:
        con.request("OPTIONS", path)
        start = time.monotonic()
        for i in range(20):
            assert con.request("OPTIONS", path).status == 200
            res = con.request("GET", path, {"Range": f"bytes={i}-{i}"})
            assert res.status == 206
        mean = (time.monotonic() - start) / 40
    assert mean < 0.015, f"{mean * 1000:.1f} ms per request"
