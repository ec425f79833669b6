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
    (head("GE@T / HTTP/1.1"), BadRequest),
    (head("GET, / HTTP/1.1"), BadRequest),
    (head("(GET) / HTTP/1.1"), BadRequest),
    (head("G\tT / HTTP/1.1"), BadRequest),
    (head("GET images HTTP/1.1"), BadRequest),
    (head("GET / HTTP/1.1", "no colon"), BadRequest),
    (head("GET / HTTP/1.1", " folded: x"), BadRequest),
    (head("GET / HTTP/1.1", "Bad Name: x"), BadRequest),
        (head("PUT / HTTP/1.1", "Transfer-Encoding: chunked",
              "Content-Length: 1"), BadRequest),
    (head("PUT / HTTP/1.1", "Content-Length: 1", "Content-Length: 2"),
     BadRequest),
    ("GET /\xe9 HTTP/1.1".encode("latin-1"), BadRequest),
])
def test_parse_head_errors(raw, error):
    with pytest.raises(error) as e:
        parse.parse_head(raw)
    assert e.value.close_connection


@pytest.mark.parametrize("method", [
    "get", "NO_SUCH_METHO", "M-1", "BASELINE-CONTROL", "A" * 40,
    "!#$%&'*+-.^_`|~09az",
])
def test_method_is_any_token(method):
    """RFC 9110 9.1: a method is a case-sensitive token; which ones the
    daemon implements is the router's question (501), not the parser's."""
    assert parse.parse_head(head(f"{method} / HTTP/1.1")).method == method


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
    ("bytes=00-03", 100, (0, 4)),
    ("bytes=0-100", 100, (0, 100)),
    ("bytes=90-" + "9" * 20, 100, (90, 10)),
])
def test_parse_range(value, size, expected):
    assert parse.parse_range(value, size) == expected


# Each refused as ovirt-imageio 2.5.1 refuses it: 416.
@pytest.mark.parametrize("value", [
    "bytes=100-100", "bytes=100-", "bytes=-10", "bytes=0-1,3-4", "bytes=5-1",
    "items=0-1", "bytes=a-b", "bytes=5", "bytes", "", "bytes=",
    "bytes= 5-6", "bytes=5 -6", "bytes=5- 6", "bytes =5-6", "bytes=5-6 ",
    "bytes=5-6\t", "BYTES=0-1", "bytes=+0-3", "bytes=0--3", "bytes=0-3-5",
    "bytes=0-3,", "bytes=0-1, 2-3", "bytes=\u0660-3", "bytes=0-1_0",
    "bytes=" + "9" * 21 + "-",
])
def test_parse_range_unsatisfiable(value):
    with pytest.raises(RangeNotSatisfiable) as e:
        parse.parse_range(value, 100)
    assert e.value.size == 100


@pytest.mark.parametrize("value,expected", [
    ("bytes 0-9/*", (0, 9, None)),
    ("bytes 4096-8191/10000", (4096, 8191, 10000)),
    ("bytes 0-3/4", (0, 3, 4)),
    ("bytes 00-03/0004", (0, 3, 4)),
])
def test_parse_content_range(value, expected):
    span = parse.parse_content_range(value)
    assert (span.first, span.last, span.total) == expected
    assert span.length == expected[1] - expected[0] + 1


# Each a 400 in ovirt-imageio 2.5.1 too.
@pytest.mark.parametrize("value", [
    "", " ", "bytes */100", "bytes 9-0/*", "items 0-1/*", "bytes 0-x/*",
    "0-9/*", "bytes 0-3", "bytes 0-3/x", "bytes 0-3/2", "bytes 0-3/3",
    "bytes 0-3/0", "bytes 0-3/-1", "bytes 0-3/ *", "bytes  0-3/*",
    "bytes 0 - 3/*", "bytes -3/*", "bytes 0-/*", "bytes=0-3/*",
    "Bytes 0-3/*", "bytes 0-3/*,bytes 4-7/*", "bytes 0-3/*, bytes 4-7/*",
    "bytes +0-3/*", "bytes 0-1_0/*", "bytes \u0660-3/*", "bytes 0-3/* ",
    "bytes " + "9" * 21 + "-" + "9" * 21 + "/*",
])
def test_parse_content_range_invalid(value):
    with pytest.raises(BadRequest, match="Content-Range"):
        parse.parse_content_range(value)


@pytest.mark.parametrize("query,expected", [
    ({}, True), ({"flush": "y"}, True), ({"flush": "n"}, False),
])
def test_query_bool(query, expected):
    assert parse.query_bool(query, "flush", True) is expected


@pytest.mark.parametrize("value", [
    "maybe", "", "Y", "N", "yes", "no", "1", "0", "true", "false", " y",
])
def test_query_bool_invalid_names_parameter(value):
    with pytest.raises(BadRequest, match="flush"):
        parse.query_bool({"flush": value}, "flush", True)


@pytest.mark.parametrize("query,expected", [
    ({}, False), ({"close": "y"}, True), ({"close": "n"}, False),
    ({"close": ""}, False), ({"close": "yes"}, False),
    ({"close": "Y"}, False), ({"close": "1"}, False),
])
def test_query_close(query, expected):
    assert parse.query_close(query) is expected


@pytest.mark.parametrize("line,size", [
    (b"0", 0), (b"1", 1), (b"ff", 255), (b"FF", 255), (b"00010", 16),
    (b"a;name=value", 10), (b"a ;ext", 10), (b"a\t", 10),
    (b"f" * 15, 16**15 - 1),
])
def test_parse_chunk_size(line, size):
    assert parse.parse_chunk_size(line) == size


@pytest.mark.parametrize("line", [
    b"", b" 1", b"-1", b"+1", b"0x10", b"g", b"1 2", b"f" * 16,
    b"1;\x00", b"1;a\nb", b"1" + b";" + b"x" * parse.MAX_CHUNK_LINE,
])
def test_parse_chunk_size_invalid(line):
    with pytest.raises(BadRequest) as e:
        parse.parse_chunk_size(line)
    assert e.value.close_connection


@pytest.mark.parametrize("headers", [
    b"Transfer-Encoding: chunked\r\nContent-Length: 4",
    b"Content-Length: 4\r\nTransfer-Encoding: chunked",
    b"Transfer-Encoding: gzip",
    b"Transfer-Encoding: gzip, chunked",
    b"Transfer-Encoding: chunked, chunked",
    b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked",
    b"Transfer-Encoding: ",
])
def test_transfer_encoding_refused(headers):
    with pytest.raises(BadRequest) as e:
        parse.parse_head(b"PUT / HTTP/1.1\r\n" + headers)
    assert e.value.close_connection


@pytest.mark.parametrize("value", [b"chunked", b"Chunked", b"CHUNKED"])
def test_transfer_encoding_chunked(value):
    head = parse.parse_head(b"PUT / HTTP/1.1\r\nTransfer-Encoding: " + value)
    assert head.chunked
    assert head.content_length is None


def test_query_int():
    assert parse.query_int({"start": "42"}, "start") == 42
    assert parse.query_int({}, "start", 7) == 7
    with pytest.raises(BadRequest, match="start"):
        parse.query_int({"start": "-1"}, "start")
    with pytest.raises(BadRequest, match="block_size"):
        parse.query_int({"block_size": "0"}, "block_size", minimum=1)


@pytest.mark.parametrize("data,ok", [
    (b"", True), (b"GE", True), (b"GET", True), (b"GET /images", True),
    (b"get /", True), (b"NO_SUCH_METHO /", True), (b"M-1", True),
    (b"A" * 40 + b" /", True),
    (b"\x16\x03\x01\x02\x00", False), (b"{json", False), (b"GE@T", False),
    (b"GET, /", False),
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
