"""Table tests of request head, range and query parsing."""

import pytest

from diskferry.daemon.http import parse
from diskferry.errors import (
    BadRequest,
    HeadersTooLarge,
    RangeNotSatisfiable,
    URITooLong,
)


def head(*lines):
    return "\r\n".join(lines).encode("latin-1")


def test_parse_head_basic():
    h = parse.parse_head(head("GET /images/abc?x=1&flush=n HTTP/1.1",
                              "Host: localhost", "Range: bytes=0-9",
                              "X-Dup: a", "x-dup: b"))
    assert h.method == "GET"
    assert h.path == "/images/abc"
    assert h.query == {"x": "1", "flush": "n"}
    assert h.headers["range"] == "bytes=0-9"
    assert h.headers["x-dup"] == "a, b"
    assert h.keep_alive


@pytest.mark.parametrize("version,connection,keep", [
    ("HTTP/1.1", None, True),
    ("HTTP/1.1", "close", False),
    ("HTTP/1.0", None, False),
    ("HTTP/1.0", "keep-alive", True),
])
def test_keep_alive(version, connection, keep):
    lines = [f"GET / {version}"]
    if connection:
        lines.append(f"Connection: {connection}")
    assert parse.parse_head(head(*lines)).keep_alive is keep


@pytest.mark.parametrize("raw,error", [
    (head("GET /" + "a" * parse.MAX_REQUEST_LINE + " HTTP/1.1"), URITooLong),
    (head("GET / HTTP/1.1", "X: " + "a" * parse.MAX_HEADER_LINE),
     HeadersTooLarge),
    (head("GET / HTTP/1.1", *["X: y"] * (parse.MAX_HEADERS + 1)),
     HeadersTooLarge),
    (head("GET / HTTP/2.0"), BadRequest),
    (head("GET /"), BadRequest),
    (head("get / HTTP/1.1"), BadRequest),
    (head("GET images HTTP/1.1"), BadRequest),
    (head("GET / HTTP/1.1", "no colon"), BadRequest),
    (head("GET / HTTP/1.1", " folded: x"), BadRequest),
    (head("GET / HTTP/1.1", "Bad Name: x"), BadRequest),
    (head("PUT / HTTP/1.1", "Transfer-Encoding: chunked"), BadRequest),
    (head("PUT / HTTP/1.1", "Content-Length: 1", "Content-Length: 2"),
     BadRequest),
    ("GET /\xe9 HTTP/1.1".encode("latin-1"), BadRequest),
])
def test_parse_head_errors(raw, error):
    with pytest.raises(error) as e:
        parse.parse_head(raw)
    assert e.value.close_connection


@pytest.mark.parametrize("value", [b"-1", b"1e3", b"abc", b"", b"0x10",
                                   "١٢".encode()])
def test_content_length_invalid(value):
    h = parse.parse_head(b"PUT / HTTP/1.1\r\nContent-Length: " + value)
    with pytest.raises(BadRequest):
        _ = h.content_length


@pytest.mark.parametrize("value,size,expected", [
    ("bytes=0-9", 100, (0, 10)),
    ("bytes=10-", 100, (10, 90)),
    ("bytes=99-99", 100, (99, 1)),
    ("bytes= 5-6", 100, (5, 2)),
])
def test_parse_range(value, size, expected):
    assert parse.parse_range(value, size) == expected


@pytest.mark.parametrize("value", [
    "bytes=0-100", "bytes=100-", "bytes=-10", "bytes=0-1,3-4", "bytes=5-1",
    "items=0-1", "bytes=a-b", "bytes=5", "bytes",
])
def test_parse_range_unsatisfiable(value):
    with pytest.raises(RangeNotSatisfiable) as e:
        parse.parse_range(value, 100)
    assert e.value.size == 100


@pytest.mark.parametrize("value,first", [
    ("bytes 0-9/*", 0),
    ("bytes 4096-8191/10000", 4096),
])
def test_parse_content_range(value, first):
    assert parse.parse_content_range(value) == first


@pytest.mark.parametrize("value", [
    "bytes */100", "bytes 9-0/*", "items 0-1/*", "bytes 0-x/*", "0-9/*",
])
def test_parse_content_range_invalid(value):
    with pytest.raises(BadRequest):
        parse.parse_content_range(value)


@pytest.mark.parametrize("query,expected", [
    ({}, True), ({"flush": "y"}, True), ({"flush": "n"}, False),
])
def test_query_bool(query, expected):
    assert parse.query_bool(query, "flush", True) is expected


def test_query_bool_invalid_names_parameter():
    with pytest.raises(BadRequest, match="flush"):
        parse.query_bool({"flush": "maybe"}, "flush", True)


def test_query_int():
    assert parse.query_int({"start": "42"}, "start") == 42
    assert parse.query_int({}, "start", 7) == 7
    with pytest.raises(BadRequest, match="start"):
        parse.query_int({"start": "-1"}, "start")
    with pytest.raises(BadRequest, match="block_size"):
        parse.query_int({"block_size": "0"}, "block_size", minimum=1)


@pytest.mark.parametrize("data,ok", [
    (b"", True), (b"GE", True), (b"GET", True), (b"GET /images", True),
    (b"\x16\x03\x01\x02\x00", False), (b"get /", False), (b"{json", False),
])
def test_check_request_line_start(data, ok):
    if ok:
        parse.check_request_line_start(data)
    else:
        with pytest.raises(BadRequest):
            parse.check_request_line_start(data)


@pytest.mark.parametrize("name,value", [
    (None, "attachment"),
    ("disk.raw", 'attachment; filename="disk.raw"'),
    ('a"b\\c\r\n.raw', 'attachment; filename="a\\"b\\\\c.raw"'),
    ("dísk.raw", "attachment; filename=\"d_sk.raw\"; "
                 "filename*=UTF-8''d%C3%ADsk.raw"),
])
def test_content_disposition(name, value):
    from diskferry.daemon.handlers.images import content_disposition
    assert content_disposition(name) == value
    value.encode("latin-1")
