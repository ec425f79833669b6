"""Conformance: GET and PUT on /images/{id}, over TLS and both UNIX sockets.

Observed in ovirt-imageio 2.5.1 beyond PROTOCOL.md:

- GET answers carry ``Content-Disposition: attachment`` (with
  ``; filename=NAME`` when the ticket has ``filename``).
- A syntactically bad Range (``bytes=a-b``, ``items=0-1``, ``5-1``) is a
  416 like a multiple or suffix range, without ``Content-Range``; only a
  range past the image size carries ``Content-Range: bytes */SIZE``.
- PUT errors found before the body is read (403, 416, bad Content-Range,
  bad ``flush``) close the connection (``Connection: close``).
- ``Content-Range: bytes FIRST-LAST/SIZE`` (a numeric total) is accepted
  like ``/*``; LAST is ignored: the body length decides how much is
  written. diskferry refuses a LAST that disagrees with the body's length
  (400, nothing written: docs/protocol.md).
- A PUT with no Content-Range and a Content-Length larger than the image
  is a 416.
- ``Expect: 100-continue`` is answered with ``100 Continue`` before the
  ticket is checked: a PUT on a read-only ticket gets 100, then 403.
- ``Transfer-Encoding: chunked`` on PUT is refused with 400 (Content-Length
  is required); diskferry accepts it (test_chunked.py).
"""

from __future__ import annotations

import os

import pytest

from servers import make_sparse_file

pytestmark = pytest.mark.all_storages

SIZE = 1 << 20
CHUNKS = {
    0: os.urandom(4096),
    65536: b"middle" * 100,
    SIZE - 8192: os.urandom(8192),
}


def expected_content(size=SIZE, chunks=CHUNKS) -> bytearray:
    buf = bytearray(size)
    for off, data in chunks.items():
        buf[off : off + len(data)] = data
    return buf


@pytest.fixture
def image(tmp_path):
    return make_sparse_file(tmp_path / "image.raw", SIZE, CHUNKS)


def read_file(path, offset=0, length=None):
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read() if length is None else f.read(length)


# --- GET ---------------------------------------------------------------------


def test_get_whole_image(endpoint, image, make_ticket):
    t = make_ticket(endpoint.server, image, SIZE, ops=["read"])
    with endpoint.raw() as con:
        res = con.request("GET", f"/images/{t['uuid']}")
    assert res.status == 200
    assert res.header("Content-Type") == "application/octet-stream"
    assert res.header("Content-Length") == str(SIZE)
    assert res.header("Content-Range") is None
    assert res.body == expected_content()


@pytest.mark.parametrize(
    "spec,first,last",
    [
        ("0-9", 0, 9),
        ("65536-66135", 65536, 66135),
        (f"{SIZE - 100}-", SIZE - 100, SIZE - 1),
        (f"{SIZE - 1}-{SIZE - 1}", SIZE - 1, SIZE - 1),
        ("4000-70000", 4000, 70000),
    ],
)
def test_get_range(endpoint, image, make_ticket, spec, first, last):
    t = make_ticket(endpoint.server, image, SIZE, ops=["read"])
    with endpoint.raw() as con:
        res = con.request("GET", f"/images/{t['uuid']}", {"Range": f"bytes={spec}"})
    assert res.status == 206
    assert res.header("Content-Range") == f"bytes {first}-{last}/{SIZE}"
    assert res.header("Content-Length") == str(last - first + 1)
    assert res.header("Content-Type") == "application/octet-stream"
    assert res.body == expected_content()[first : last + 1]


@pytest.mark.parametrize("first,last", [(SIZE - 10, SIZE), (0, SIZE * 2)])
def test_get_range_ending_past_end(endpoint, image, make_ticket, first, last):
    """ovirt-imageio refuses it (416); diskferry serves the rest of the
    image, as RFC 9110 says and nbdkit's curl plugin needs."""
    t = make_ticket(endpoint.server, image, SIZE, ops=["read"])
    with endpoint.raw() as con:
        res = con.request(
            "GET", f"/images/{t['uuid']}", {"Range": f"bytes={first}-{last}"}
        )
    if endpoint.server.name == "diskferry":
        assert res.status == 206
        assert res.header("Content-Range") == f"bytes {first}-{SIZE - 1}/{SIZE}"
        assert res.body == expected_content()[first:]
    else:
        assert res.status == 416
        assert res.header("Content-Range") == f"bytes */{SIZE}"


@pytest.mark.parametrize("spec", [f"{SIZE}-{SIZE + 10}"])
def test_get_range_past_end_416(endpoint, image, make_ticket, spec):
    t = make_ticket(endpoint.server, image, SIZE, ops=["read"])
    with endpoint.raw() as con:
        res = con.request("GET", f"/images/{t['uuid']}", {"Range": f"bytes={spec}"})
    assert res.status == 416
    assert res.header("Content-Range") == f"bytes */{SIZE}"
    assert res.header("Content-Type").startswith("text/plain")
    assert int(res.header("Content-Length")) == len(res.body)


@pytest.mark.parametrize("first,imageio", [(SIZE, 206), (SIZE * 2, 400)])
def test_get_open_range_past_end(endpoint, image, make_ticket, first, imageio):
    """``bytes=SIZE-``: diskferry 416; ovirt-imageio answers 206 with an
    empty body and ``Content-Range: bytes SIZE-(SIZE-1)/SIZE``, and 400
    further out."""
    t = make_ticket(endpoint.server, image, SIZE, ops=["read"])
    with endpoint.raw() as con:
        res = con.request("GET", f"/images/{t['uuid']}", {"Range": f"bytes={first}-"})
    if endpoint.server.name == "diskferry":
        assert res.status == 416
        assert res.header("Content-Range") == f"bytes */{SIZE}"
    else:
        assert res.status == imageio
        assert res.body == b"" or res.status == 400


@pytest.mark.parametrize(
    "spec", ["bytes=0-1,4-5", "bytes=-5", "bytes=a-b", "items=0-1", "bytes=9-1"]
)
def test_get_unsatisfiable_range_416(endpoint, image, make_ticket, spec):
    t = make_ticket(endpoint.server, image, SIZE, ops=["read"])
    with endpoint.raw() as con:
        res = con.request("GET", f"/images/{t['uuid']}", {"Range": spec})
        assert res.status == 416
        assert res.header("Content-Type").startswith("text/plain")
        assert int(res.header("Content-Length")) == len(res.body) > 0


def test_get_image_shorter_than_ticket(endpoint, image, make_ticket):
    """The image holds SIZE bytes, its ticket says twice that: the whole
    image is what the storage has, and a range past it is a 416 naming
    the storage's size."""
    t = make_ticket(endpoint.server, image, 2 * SIZE, ops=["read"])
    path = f"/images/{t['uuid']}"
    with endpoint.raw() as con:
        res = con.request("GET", path)
        assert res.status == 200
        assert res.body == expected_content()
        res = con.request("GET", path, {"Range": f"bytes=0-{4095}"})
        assert res.status == 206
        assert res.header("Content-Range") == f"bytes 0-4095/{2 * SIZE}"
        assert res.body == expected_content()[:4096]
    for first, last in ((SIZE - 4096, SIZE + 4095), (SIZE, 2 * SIZE - 1)):
        with endpoint.raw() as con:
            res = con.request("GET", path, {"Range": f"bytes={first}-{last}"})
        assert res.status == 416
        assert res.header("Content-Range") == f"bytes */{SIZE}"


def test_get_image_shorter_than_ticket_range_to_its_end(endpoint, image,
                                                       make_ticket):
    """A range to the end of the ticket (open, or ending past it) on
    storage shorter than the ticket: ovirt-imageio refuses one that ends
    past the ticket naming the ticket's size and serves an open one from
    the storage; diskferry reads both as the rest of the ticket's image,
    which the storage cannot serve, and names the storage's size
    (docs/protocol.md). A range that starts past the ticket is the
    ticket's 416 on both."""
    t = make_ticket(endpoint.server, image, 2 * SIZE, ops=["read"])
    path = f"/images/{t['uuid']}"
    diskferry = endpoint.server.name == "diskferry"
    with endpoint.raw() as con:
        res = con.request("GET", path, {"Range": f"bytes=0-{2 * SIZE + 9}"})
    assert res.status == 416
    assert res.header("Content-Range") == \
        f"bytes */{SIZE if diskferry else 2 * SIZE}"
    with endpoint.raw() as con:
        res = con.request("GET", path, {"Range": "bytes=4096-"})
    if diskferry:
        assert res.status == 416
        assert res.header("Content-Range") == f"bytes */{SIZE}"
    else:
        assert res.status == 206
        assert res.header("Content-Range") == f"bytes 4096-{SIZE - 1}/{2 * SIZE}"
        assert res.body == expected_content()[4096:]
    with endpoint.raw() as con:
        res = con.request("GET", path,
                          {"Range": f"bytes={2 * SIZE + 5}-{2 * SIZE + 9}"})
    assert res.status == 416
    assert res.header("Content-Range") == f"bytes */{2 * SIZE}"


@pytest.mark.file_only  # an NBD export's size is fixed while it is served
def test_get_image_truncated_while_ticket_lives(endpoint, image, make_ticket):
    t = make_ticket(endpoint.server, image, SIZE, ops=["read"])
    path = f"/images/{t['uuid']}"
    with endpoint.raw() as con:
        res = con.request("GET", path, {"Range": f"bytes={SIZE - 4096}-{SIZE - 1}"})
        assert res.status == 206
        os.truncate(image, SIZE // 2)
        res = con.request("GET", path, {"Range": f"bytes={SIZE - 4096}-{SIZE - 1}"})
        assert res.status == 416
        assert res.header("Content-Range") == f"bytes */{SIZE // 2}"


def test_get_filename(endpoint, image, make_ticket):
    t = make_ticket(endpoint.server, image, SIZE, ops=["read"], filename="disk.raw")
    with endpoint.raw() as con:
        res = con.request("GET", f"/images/{t['uuid']}", {"Range": "bytes=0-0"})
    assert res.status == 206
    disposition = res.header("Content-Disposition")
    assert disposition is not None
    assert disposition.startswith("attachment")
    assert "disk.raw" in disposition


def test_get_filename_not_ascii(endpoint, image, make_ticket):
    """ovirt-imageio sends the name's UTF-8 bytes as they are; diskferry
    RFC 6266's ``filename*`` beside an ASCII ``filename`` (docs/protocol.md)."""
    name = "dísk €.raw"
    t = make_ticket(endpoint.server, image, SIZE, ops=["read"], filename=name)
    with endpoint.raw() as con:
        res = con.request("GET", f"/images/{t['uuid']}", {"Range": "bytes=0-0"})
    assert res.status == 206
    disposition = res.header("Content-Disposition")
    if endpoint.server.name == "diskferry":
        assert disposition == ('attachment; filename="d_sk _.raw"; '
                               "filename*=UTF-8''d%C3%ADsk%20%E2%82%AC.raw")
    else:
        # The raw response head is read as ISO-8859-1.
        assert disposition == ("attachment; filename=" +
                               name.encode().decode("iso-8859-1"))


def test_get_unknown_ticket_403_closes(endpoint):
    with endpoint.raw() as con:
        res = con.request("GET", "/images/no-such-ticket")
        assert res.status == 403
        assert res.header("Content-Type").startswith("text/plain")
        assert con.at_eof()


def test_get_expired_ticket_403(endpoint, image, make_ticket):
    t = make_ticket(endpoint.server, image, SIZE)
    endpoint.server.extend_ticket(t["uuid"], 0)
    with endpoint.raw() as con:
        res = con.request("GET", f"/images/{t['uuid']}", {"Range": "bytes=0-9"})
    assert res.status == 403


def test_write_ticket_can_read(endpoint, image, make_ticket):
    t = make_ticket(endpoint.server, image, SIZE, ops=["write"])
    with endpoint.raw() as con:
        res = con.request("GET", f"/images/{t['uuid']}", {"Range": "bytes=0-99"})
    assert res.status == 206
    assert res.body == CHUNKS[0][:100]


# --- PUT ---------------------------------------------------------------------


@pytest.mark.parametrize("flush", [None, "y", "n"])
def test_put_at_offset(endpoint, image, make_ticket, flush):
    t = make_ticket(endpoint.server, image, SIZE)
    data = os.urandom(10000)
    offset = 65536 + 100
    query = "" if flush is None else f"?flush={flush}"
    before = read_file(image)
    with endpoint.raw() as con:
        res = con.request(
            "PUT",
            f"/images/{t['uuid']}{query}",
            {"Content-Range": f"bytes {offset}-{offset + len(data) - 1}/*"},
            data,
        )
    assert res.status == 200
    assert res.header("Content-Length") == "0"
    after = read_file(image)
    assert after[offset : offset + len(data)] == data
    assert after[:offset] == before[:offset]
    assert after[offset + len(data) :] == before[offset + len(data) :]


def test_put_without_range_writes_at_zero(endpoint, image, make_ticket):
    t = make_ticket(endpoint.server, image, SIZE)
    data = b"head" * 1024
    with endpoint.raw() as con:
        res = con.request("PUT", f"/images/{t['uuid']}", body=data)
    assert res.status == 200
    after = read_file(image)
    assert after[: len(data)] == data
    assert after[len(data) : 4096 + len(data)] == expected_content()[len(data) :][:4096]


@pytest.mark.parametrize("last", [302, 301])
def test_put_range_with_total(endpoint, image, make_ticket, last):
    """A numeric total is accepted like ``*``. When LAST disagrees with
    the body's length, ovirt-imageio writes the body and ignores LAST;
    diskferry refuses the contradiction, writing nothing."""
    t = make_ticket(endpoint.server, image, SIZE)
    before = read_file(image)
    with endpoint.raw() as con:
        res = con.request(
            "PUT",
            f"/images/{t['uuid']}",
            {"Content-Range": f"bytes 300-{last}/{SIZE}"},
            b"abc",
        )
    if last == 301 and endpoint.server.name == "diskferry":
        assert res.status == 400
        assert read_file(image) == before
    else:
        assert res.status == 200
        expected = CHUNKS[0][299:300] + b"abc" + CHUNKS[0][303:304]
        assert read_file(image, 299, 5) == expected


def test_put_whole_image_then_get(endpoint, tmp_path, make_ticket):
    image = make_sparse_file(tmp_path / "empty.raw", SIZE)
    t = make_ticket(endpoint.server, image, SIZE)
    data = os.urandom(SIZE)
    with endpoint.raw() as con:
        assert con.request("PUT", f"/images/{t['uuid']}", body=data).status == 200
        res = con.request("GET", f"/images/{t['uuid']}")
    assert res.status == 200
    assert res.body == data
    assert read_file(image) == data


def test_put_missing_content_length_400(endpoint, image, make_ticket):
    t = make_ticket(endpoint.server, image, SIZE)
    before = read_file(image)
    with endpoint.raw() as con:
        con.send(
            f"PUT /images/{t['uuid']} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode()
        )
        res = con.response("PUT")
    assert res.status == 400
    assert res.header("Content-Type").startswith("text/plain")
    assert b"Content-Length" in res.body
    assert read_file(image) == before


def test_put_chunked(endpoint, image, make_ticket):
    """ovirt-imageio refuses a chunked body; diskferry writes it."""
    t = make_ticket(endpoint.server, image, SIZE)
    before = read_file(image)
    with endpoint.raw() as con:
        con.send(
            f"PUT /images/{t['uuid']} HTTP/1.1\r\nHost: localhost\r\n"
            "Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n".encode()
        )
        res = con.response("PUT")
    if endpoint.server.name == "diskferry":
        assert res.status == 200
        assert read_file(image) == b"abc" + before[3:]
    else:
        assert res.status == 400
        assert read_file(image) == before


@pytest.mark.parametrize("value", ["x", "-3", "1.5"])
def test_put_bad_content_length_400(endpoint, image, make_ticket, value):
    t = make_ticket(endpoint.server, image, SIZE)
    before = read_file(image)
    with endpoint.raw() as con:
        con.send(
            f"PUT /images/{t['uuid']} HTTP/1.1\r\nHost: localhost\r\n"
            f"Content-Length: {value}\r\n\r\nabc".encode()
        )
        res = con.response("PUT")
    assert res.status == 400
    assert read_file(image) == before


@pytest.mark.parametrize(
    "content_range,length",
    [
        (f"bytes {SIZE - 1}-{SIZE + 1}/*", 3),
        (f"bytes {SIZE}-{SIZE + 9}/*", 10),
        (None, SIZE + 1),
    ],
    ids=["straddle", "after", "no-range"],
)
def test_put_past_end_416(endpoint, image, make_ticket, content_range, length):
    t = make_ticket(endpoint.server, image, SIZE)
    before = read_file(image)
    headers = {} if content_range is None else {"Content-Range": content_range}
    with endpoint.raw() as con:
        res = con.request("PUT", f"/images/{t['uuid']}", headers, b"z" * length)
    assert res.status == 416
    assert res.header("Content-Range") == f"bytes */{SIZE}"
    assert os.path.getsize(image) == SIZE
    assert read_file(image) == before


@pytest.mark.parametrize("value", ["garbage", "bytes x-y/*", "bytes */100"])
def test_put_bad_content_range_400(endpoint, image, make_ticket, value):
    t = make_ticket(endpoint.server, image, SIZE)
    before = read_file(image)
    with endpoint.raw() as con:
        res = con.request(
            "PUT", f"/images/{t['uuid']}", {"Content-Range": value}, b"abc"
        )
    assert res.status == 400
    assert res.header("Content-Type").startswith("text/plain")
    assert read_file(image) == before


def test_put_bad_flush_400(endpoint, image, make_ticket):
    t = make_ticket(endpoint.server, image, SIZE)
    before = read_file(image)
    with endpoint.raw() as con:
        res = con.request("PUT", f"/images/{t['uuid']}?flush=x", body=b"abc")
    assert res.status == 400
    assert b"flush" in res.body
    assert read_file(image) == before


def test_put_read_only_ticket_403(endpoint, image, make_ticket):
    t = make_ticket(endpoint.server, image, SIZE, ops=["read"])
    before = read_file(image)
    with endpoint.raw() as con:
        res = con.request("PUT", f"/images/{t['uuid']}", body=b"abc")
        assert res.status == 403
        assert res.header("Content-Type").startswith("text/plain")
        assert con.at_eof()
    assert read_file(image) == before


def test_put_unknown_ticket_403(endpoint):
    with endpoint.raw() as con:
        res = con.request("PUT", "/images/no-such-ticket", body=b"abc")
        assert res.status == 403
        assert con.at_eof()


def test_put_expect_100_continue(endpoint, image, make_ticket):
    t = make_ticket(endpoint.server, image, SIZE)
    data = b"continued" * 100
    with endpoint.raw() as con:
        con.send(
            (
                f"PUT /images/{t['uuid']} HTTP/1.1\r\nHost: localhost\r\n"
                f"Content-Length: {len(data)}\r\nExpect: 100-continue\r\n"
                f"Content-Range: bytes 8192-{8192 + len(data) - 1}/*\r\n\r\n"
            ).encode()
        )
        interim = con.response("PUT")
        assert interim.status == 100
        con.send(data)
        res = con.response("PUT")
        assert res.status == 200
        # The connection is still usable.
        res = con.request("GET", f"/images/{t['uuid']}", {"Range": "bytes=8192-9091"})
        assert res.status == 206
        assert res.body == data
    assert read_file(image, 8192, len(data)) == data


def test_put_expect_100_continue_refused_ticket(endpoint, image, make_ticket):
    """A forbidden upload is refused; ovirt-imageio sends 100 Continue before
    it looks at the ticket, so a 100 before the 403 is allowed."""
    t = make_ticket(endpoint.server, image, SIZE, ops=["read"])
    before = read_file(image)
    with endpoint.raw() as con:
        con.send(
            f"PUT /images/{t['uuid']} HTTP/1.1\r\nHost: localhost\r\n"
            "Content-Length: 1000\r\nExpect: 100-continue\r\n\r\n".encode()
        )
        res = con.response("PUT")
        if res.status == 100:
            try:
                con.send(b"q" * 1000)
            except (BrokenPipeError, ConnectionResetError):
                pass
            res = con.response("PUT")
    assert res.status == 403
    assert read_file(image) == before


def test_parallel_readers(endpoint, tmp_path, make_ticket):
    import threading

    size = 8 * (1 << 20)
    content = os.urandom(size)
    image = make_sparse_file(tmp_path / "big.raw", size, {0: content})
    t = make_ticket(endpoint.server, image, size, ops=["read"])
    part = size // 8
    results = {}

    def read(i):
        with endpoint.raw() as con:
            first = i * part
            res = con.request(
                "GET",
                f"/images/{t['uuid']}",
                {"Range": f"bytes={first}-{first + part - 1}"},
            )
            results[i] = (res.status, res.body)

    threads = [threading.Thread(target=read, args=(i,)) for i in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert sorted(results) == list(range(8))
    for i, (status, body) in results.items():
        assert status == 206
        assert body == content[i * part : (i + 1) * part]
