"""Parsing of the request head and of the headers diskferry uses.

Pure functions over bytes and strings, with no I/O, so that every limit
and every malformed input can be tested with tables.
"""

import re
import urllib.parse
from dataclasses import dataclass, field

from diskferry.errors import (
    BadRequest,
    HeadersTooLarge,
    RangeNotSatisfiable,
    URITooLong,
)

#: Longest request line accepted. Image URLs are ~60 bytes; 8 KiB is what
#: most servers allow (nginx, Apache) and what http.server's 65536 caps.
MAX_REQUEST_LINE = 8192

#: Longest header line accepted; http.client and http.server use 65536,
#: nginx 8 KiB. No header diskferry reads needs more than a few hundred.
MAX_HEADER_LINE = 8192

#: Most header lines accepted; the same as http.client's _MAXHEADERS.
MAX_HEADERS = 100

#: Largest whole head (request line + headers), bounding memory per
#: connection before any authorization.
MAX_HEAD = MAX_REQUEST_LINE + MAX_HEADERS * 256

#: A character of an RFC 9110 token (5.6.2), what a method and a header
#: field name are made of.
TOKEN_CHAR = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]"

#: A header field name: a token.
HEADER_NAME = re.compile(rf"{TOKEN_CHAR}+\Z".encode())

#: A request method: a token, case-sensitive (RFC 9110 9.1). One the
#: daemon does not implement is the router's 501, not a malformed request.
METHOD = re.compile(rf"{TOKEN_CHAR}+\Z")

#: Most digits of a number in a header or query (lengths, offsets, block
#: sizes). The largest offset a file can have, 2**63-1, has 19; a longer
#: number is refused before ``int()``, which costs quadratic time on long
#: strings and raises ValueError past 4,300 digits (CPython's
#: int_max_str_digits), a 500 had it escaped.
MAX_DIGITS = 20


@dataclass
class RequestHead:
    """The parsed request line and headers of one request."""

    method: str
    target: str
    version: str
    path: str
    query: dict[str, str]
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def keep_alive(self) -> bool:
        conn = self.headers.get("connection", "").lower()
        if self.version == "HTTP/1.0":
            return conn == "keep-alive"
        return conn != "close"

    @property
    def content_length(self) -> int | None:
        """Body length, or None when the header is absent."""
        value = self.headers.get("content-length")
        if value is None:
            return None
        return parse_int_header("Content-Length", value)

    @property
    def expects_continue(self) -> bool:
        return self.headers.get("expect", "").lower() == "100-continue"

    @property
    def chunked(self) -> bool:
        """True when the body comes in chunks (``parse_headers`` refused
        every other transfer coding)."""
        return "transfer-encoding" in self.headers


def check_request_line_length(line_length: int) -> None:
    if line_length > MAX_REQUEST_LINE:
        raise URITooLong(
            f"Request line longer than {MAX_REQUEST_LINE} bytes")


#: What a request line can start with: a method and a space. A method's
#: length is bounded by MAX_REQUEST_LINE only, as when the line comes whole.
REQUEST_LINE_START = re.compile(rf"{TOKEN_CHAR}*( |\Z)".encode())


def check_request_line_start(data: bytes | bytearray) -> None:
    """Refuse early what cannot become a request line.

    Called while the line is still incomplete, so that a peer speaking
    another protocol (a TLS hello on the plain port) gets its 400 at once
    instead of waiting for a line end that never comes.
    """
    check_request_line_length(len(data))
    if not REQUEST_LINE_START.match(data):
        raise BadRequest("Not an HTTP request; is this a TLS client on "
                         "a plain HTTP service?", close_connection=True)


def parse_head(head: bytes) -> RequestHead:
    """Parse a request head: request line and headers, without the blank line.

    Raises the error each limit maps to: 414 for the request line, 431 for
    headers, 400 for anything malformed.
    """
    lines = head.split(b"\r\n")
    request_line = lines[0]
    check_request_line_length(len(request_line))
    method, target, version = parse_request_line(request_line)
    header_lines = lines[1:]
    if len(header_lines) > MAX_HEADERS:
        raise HeadersTooLarge(f"More than {MAX_HEADERS} header lines")
    headers = parse_headers(header_lines)
    path, query = split_target(target)
    return RequestHead(method, target, version, path, query, headers)


def parse_request_line(line: bytes) -> tuple[str, str, str]:
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError:
        raise BadRequest("Request line is not ASCII",
                         close_connection=True) from None
    parts = text.split(" ")
    if len(parts) != 3:
        raise BadRequest(f"Malformed request line: {text[:100]!r}",
                         close_connection=True)
    method, target, version = parts
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise BadRequest(f"Unsupported HTTP version: {version[:20]!r}",
                         close_connection=True)
    if not METHOD.match(method):
        raise BadRequest(f"Malformed method: {method[:20]!r}",
                         close_connection=True)
    if not target.startswith("/") and target != "*":
        raise BadRequest(f"Malformed request target: {target[:100]!r}",
                         close_connection=True)
    return method, target, version


def parse_headers(lines: list[bytes]) -> dict[str, str]:
    """Header lines to a dict keyed by lower-case name.

    Repeated headers are joined with ", " as RFC 9110 allows; obsolete
    line folding is refused.
    """
    headers: dict[str, str] = {}
    for line in lines:
        if len(line) > MAX_HEADER_LINE:
            raise HeadersTooLarge(
                f"Header line longer than {MAX_HEADER_LINE} bytes")
        name, sep, value = line.partition(b":")
        if not sep or not HEADER_NAME.match(name):
            raise BadRequest(f"Malformed header line: {line[:100]!r}",
                             close_connection=True)
        key = name.decode("ascii").lower()
        text = value.strip().decode("latin-1")
        if key in headers:
            if key == "content-length" and headers[key] != text:
                raise BadRequest("Conflicting Content-Length headers",
                                 close_connection=True)
            if key != "content-length":
                text = headers[key] + ", " + text
        headers[key] = text
    check_transfer_encoding(headers)
    return headers


def check_transfer_encoding(headers: dict[str, str]) -> None:
    """Only ``Transfer-Encoding: chunked`` alone, and never with
    ``Content-Length``.

    A request with both is how request smuggling starts (RFC 9112 6.1:
    a server may reject it, and must close the connection after it);
    another coding (gzip, or chunked applied twice) would need a decoder
    diskferry does not have.
    """
    coding = headers.get("transfer-encoding")
    if coding is None:
        return
    if "content-length" in headers:
        raise BadRequest("Content-Length and Transfer-Encoding together",
                         close_connection=True)
    if coding.lower() != "chunked":
        raise BadRequest(f"Unsupported Transfer-Encoding: {_excerpt(coding)}"
                         f"; only chunked is supported",
                         close_connection=True)


#: Longest chunk-size line (size and extensions) of a chunked body; a
#: size needs 16 hex digits at most, and no client sends extensions.
MAX_CHUNK_LINE = 1024

#: Most hex digits of a chunk size: 15 keep it below 2**60, far beyond
#: any image, and make the number cheap to convert.
MAX_CHUNK_DIGITS = 15

#: A chunk size and optional extensions (no control characters but tab).
CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,%d})[ \t]*"
                        rb"(;[^\x00-\x08\x0a-\x1f\x7f]*)?\Z"
                        % MAX_CHUNK_DIGITS)


def parse_chunk_size(line: bytes) -> int:
    """A chunk-size line, without its CRLF, to the chunk's size.

    Chunk extensions (``;name=value``) are ignored; anything else, a size
    too long to be real included, is a 400 that closes the connection,
    since the rest of the stream can no longer be framed.
    """
    if len(line) > MAX_CHUNK_LINE:
        raise BadRequest(f"Chunk size line longer than {MAX_CHUNK_LINE} "
                         f"bytes", close_connection=True)
    match = CHUNK_SIZE.match(line)
    if match is None:
        raise BadRequest(f"Invalid chunk size line: {line[:40]!r}",
                         close_connection=True)
    return int(match.group(1), 16)


def split_target(target: str) -> tuple[str, dict[str, str]]:
    """Split a request target into an unquoted path and a query dict."""
    raw_path, _, raw_query = target.partition("?")
    path = urllib.parse.unquote(raw_path)
    try:
        pairs = urllib.parse.parse_qsl(raw_query, keep_blank_values=True,
                                       strict_parsing=False)
    except ValueError as e:
        raise BadRequest(f"Malformed query string: {e}") from None
    return path, dict(pairs)


def decimal(text: str) -> int | None:
    """``text`` as a non-negative integer, or None if it is not one.

    Only ASCII digits, at most MAX_DIGITS of them: ``str.isdigit`` alone
    accepts other scripts' digits and superscripts, and ``int`` accepts
    signs, spaces and underscores.
    """
    if not 0 < len(text) <= MAX_DIGITS or not text.isascii() or \
            not text.isdigit():
        return None
    return int(text)


def parse_int_header(name: str, value: str) -> int:
    number = decimal(value)
    if number is None:
        raise BadRequest(f"Invalid {name} header: {_excerpt(value)}; "
                         f"expected at most {MAX_DIGITS} digits",
                         close_connection=True)
    return number


def _excerpt(value: str, limit: int = 40) -> str:
    """A peer's value for an error message: quoted, escaped, shortened."""
    if len(value) > limit:
        return f"{value[:limit]!r}... ({len(value)} characters)"
    return repr(value)


#: ``Range: bytes=FIRST-[LAST]``: no space inside, one range.
RANGE = re.compile(r"bytes=([0-9]*)-([0-9]*)\Z")


def parse_range(value: str, size: int) -> tuple[int, int]:
    """``Range: bytes=FIRST-LAST`` or ``bytes=FIRST-`` to (offset, length).

    Multiple ranges and suffix ranges are not supported, nor is a range
    that starts past the image; like ovirt-imageio, every Range header
    that cannot be served, malformed ones (space inside the value, a sign,
    a unit other than ``bytes``) included, is answered 416. Space around the
    value is not part of it (RFC 9110 5.5) and was stripped already.
    """
    match = RANGE.match(value)
    if match is None:
        if "," in value:
            raise RangeNotSatisfiable("Multiple ranges are not supported",
                                      size=size)
        raise RangeNotSatisfiable(
            f"Invalid Range header: {_excerpt(value, 60)}", size=size)
    first_s, last_s = match.groups()
    if not first_s:
        raise RangeNotSatisfiable(
            f"Suffix ranges are not supported: {_excerpt(value, 60)}",
            size=size)
    first = _range_int(first_s, value, size)
    if last_s:
        last = _range_int(last_s, value, size)
        if last < first:
            raise RangeNotSatisfiable(
                f"Invalid Range header: {_excerpt(value, 60)}, first > last",
                size=size)
    else:
        last = size - 1
    if first >= size:
        raise RangeNotSatisfiable(
            f"Range {first}-{last} is outside the image (size {size})",
            size=size)
    # A last byte past the end means the rest of the image (RFC 9110
    # 14.1.2), where ovirt-imageio answers 416: nbdkit's curl plugin asks
    # for one byte more than it reads, so its last read ends past it.
    return first, min(last, size - 1) - first + 1


#: ``Content-Range: bytes FIRST-LAST/TOTAL``, TOTAL a number or ``*``.
CONTENT_RANGE = re.compile(r"bytes ([0-9]+)-([0-9]+)/([0-9]+|\*)\Z")


@dataclass(frozen=True)
class ContentRange:
    """Where a PUT body goes: bytes ``first`` to ``last``, both included."""

    first: int
    last: int
    total: int | None

    @property
    def length(self) -> int:
        return self.last - self.first + 1


def parse_content_range(value: str) -> ContentRange:
    """``Content-Range: bytes FIRST-LAST/TOTAL`` (TOTAL ``*`` or a number).

    Strict, as ovirt-imageio: one space after ``bytes``, none elsewhere,
    FIRST <= LAST, LAST < TOTAL. Anything else is a 400: a body written
    at an offset the client did not mean is silent corruption. An empty
    or blank value is malformed too, not the same as no header.
    """
    match = CONTENT_RANGE.match(value)
    if match is None:
        raise BadRequest(f"Invalid Content-Range header: {_excerpt(value, 60)}")
    first_s, last_s, total_s = match.groups()
    first = _content_range_int(first_s, value)
    last = _content_range_int(last_s, value)
    if last < first:
        raise BadRequest(f"Invalid Content-Range header: {_excerpt(value, 60)}"
                         f", first > last")
    total = None if total_s == "*" else _content_range_int(total_s, value)
    if total is not None and last >= total:
        raise BadRequest(f"Invalid Content-Range header: {_excerpt(value, 60)}"
                         f", last >= total")
    return ContentRange(first, last, total)


def _range_int(text: str, value: str, size: int) -> int:
    number = decimal(text)
    if number is None:
        raise RangeNotSatisfiable(
            f"Invalid Range header: {_excerpt(value, 60)}", size=size)
    return number


def _content_range_int(text: str, value: str) -> int:
    number = decimal(text)
    if number is None:
        raise BadRequest(
            f"Invalid Content-Range header: {_excerpt(value, 60)}")
    return number


def query_int(query: dict[str, str], name: str, default: int | None = None,
              minimum: int = 0) -> int | None:
    """An integer query parameter, 400 naming it when invalid."""
    value = query.get(name)
    if value is None:
        return default
    number = decimal(value)
    if number is None or number < minimum:
        raise BadRequest(f"Invalid {name!r} query parameter: "
                         f"{_excerpt(value)}")
    return number


def query_bool(query: dict[str, str], name: str, default: bool) -> bool:
    """A ``y``/``n`` query parameter (``flush=y|n``), exactly these two
    values as ovirt-imageio: ``yes``, ``Y``, ``1`` or an empty value are
    a 400 naming the parameter, never a guess."""
    value = query.get(name)
    if value is None:
        return default
    if value == "y":
        return True
    if value == "n":
        return False
    raise BadRequest(f"Invalid {name!r} query parameter: {_excerpt(value)}, "
                     f"expected y or n")


def query_close(query: dict[str, str]) -> bool:
    """``close=y``: close the connection after the answer.

    As ovirt-imageio, only ``y`` asks for it; any other value (``n``,
    ``yes``, empty) is the default, keeping the connection.
    """
    return query.get("close") == "y"
