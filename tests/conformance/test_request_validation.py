"""Conformance: every query parameter and request header that ovirt-imageio
2.5.1 reads on /images/{id}, one table row each, against both daemons.

The rows are the table of docs/protocol.md ("Query parameters and request
headers"): each was sent to a running ovirt-imageio 2.5.1 first, and its
answer is the expectation; where diskferry deliberately differs, the row
has diskferry's own expectation and the doc says why. Each row checks the
status, whether the connection is closed after the answer, and for a PUT
where its 4 bytes landed, or that nothing was written.

Observed beyond the table: ovirt-imageio closes the connection after
every 400 to a PUT (its body unread); diskferry reads a small refused
body and keeps the connection, so the close is asserted on ovirt-imageio
only for those rows. Header values are sent with the exact bytes given,
trailing whitespace included.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from servers import make_sparse_file

SIZE = 1 << 20
FILL = b"k"
BODY = b"abcd"


@dataclass(frozen=True)
class Row:
    name: str
    method: str
    target: str  # after /images/{id}
    headers: tuple[str, ...] = ()
    status: int = 200
    # Whether ovirt-imageio closes the connection after the answer.
    closes: bool = False
    # What diskferry answers where it deliberately differs.
    diskferry: int | None = None
    # Whether diskferry closes, where it differs.
    diskferry_closes: bool | None = None
    # PUT: where BODY lands when the answer is 200.
    offset: int = 0
    # The body sent; None: BODY for PUT, nothing for GET.
    body: bytes | None = None

    def expected(self, kind):
        if kind == "diskferry" and self.diskferry is not None:
            return self.diskferry
        return self.status

    def expected_close(self, kind):
        if kind == "diskferry" and self.diskferry_closes is not None:
            return self.diskferry_closes
        return self.closes


def put(name, target="?flush=n", headers=(), **kw):
    return Row(name, "PUT", target, ("Content-Length: 4",) + headers, **kw)


def put_range(name, value, **kw):
    return put(name, headers=(f"Content-Range: {value}",), **kw)


def get_range(name, value, **kw):
    return Row(name, "GET", "", (f"Range: {value}",), **kw)


ROWS = [
    # flush: exactly y or n.
    put("flush=y", "?flush=y"),
    put("flush=n", "?flush=n"),
    *(put(f"flush={v!r}", f"?flush={v}", status=400, closes=True,
          diskferry_closes=False)
      for v in ("yes", "no", "1", "0", "Y", "", "x", "true")),
    Row("flush-on-get-ignored", "GET", "?flush=x", status=200),
    # close=y: answer, then close; on GET and PUT only.
    Row("get-close=y", "GET", "?close=y", ("Range: bytes=0-1",), 206, closes=True),
    put("put-close=y", "?flush=n&close=y", closes=True),
    Row("get-close=y-error", "GET", "?close=y", ("Range: bytes=5-1",), 416,
        closes=True),
    *(Row(f"get-close={v!r}", "GET", f"?close={v}", ("Range: bytes=0-1",), 206)
      for v in ("n", "", "x", "yes", "1", "Y")),
    # ovirt-imageio honours close=y on GET and PUT only; diskferry on
    # every request of the images API.
    Row("options-close=y", "OPTIONS", "?close=y", diskferry_closes=True),
    Row("patch-close=y", "PATCH", "?close=y",
        ("Content-Type: application/json", "Content-Length: 14"),
        diskferry_closes=True),
    Row("extents-close=y", "GET", "/extents?close=y", diskferry_closes=True),
    Row("put-close=y-error", "PUT", "?flush=x&close=y",
        ("Content-Length: 4",), 400, closes=True),
    # Content-Range on PUT.
    put_range("cr-star", "bytes 0-3/*"),
    put_range("cr-total", "bytes 0-3/4"),
    put_range("cr-total-size", f"bytes 0-3/{SIZE}"),
    put_range("cr-leading-zeros", "bytes 00-03/0004"),
    put_range("cr-offset", "bytes 10-13/*", offset=10),
    put_range("cr-total-past-image", "bytes 0-3/2000000"),
    put_range("cr-past-image", f"bytes {SIZE - 1}-{SIZE + 2}/*", status=416,
              closes=True, diskferry_closes=False),
    *(put_range(f"cr={v!r}", v, status=400, closes=True,
                diskferry_closes=False) for v in (
        "", " ", "bytes 0-3/x", "bytes 0-3/2", "bytes 0-3/3", "bytes 0-3/0",
        "bytes 0-3/-1", "bytes 0-3/ *", "bytes 0-3", "bytes */4",
        "bytes 3-0/*", "items 0-3/*", "Bytes 0-3/*", "bytes=0-3/*",
        "bytes  0-3/*", "bytes 0 - 3/*", "bytes -3/*", "bytes 0-/*",
        "bytes +0-3/*", "bytes 0-1_0/*", "bytes 0-3/*,bytes 4-7/*",
    )),
    # Deliberate differences: a range that disagrees with the body, or
    # said twice, is refused; space after the value is not part of it.
    put_range("cr-longer-than-body", "bytes 0-5/*", diskferry=400),
    put_range("cr-shorter-than-body", "bytes 0-2/*", diskferry=400),
    put("cr-twice", headers=("Content-Range: bytes 0-3/*",
                             "Content-Range: bytes 8-11/*"), diskferry=400),
    put_range("cr-trailing-space", "bytes 0-3/* ", status=400, closes=True,
              diskferry=200, diskferry_closes=False),
    # A LAST of "*": ovirt-imageio writes the body at FIRST; diskferry
    # refuses what RFC 9110 does not define and it could not check
    # against Content-Length.
    put_range("cr-last-star", "bytes 0-*/*", diskferry=400),
    put_range("cr-last-star-offset", "bytes 10-*/*", offset=10, diskferry=400),
    # Range on GET.
    get_range("range", "bytes=0-3", status=206),
    get_range("range-open", "bytes=0-", status=206),
    get_range("range-leading-zeros", "bytes=00-03", status=206),
    get_range("range-leading-space", " bytes=0-3", status=206),
    *(get_range(f"range={v!r}", v, status=416) for v in (
        "bytes= 0-3", "bytes=0 -3", "bytes=0- 3", "bytes =0-3", "bytes=-3",
        "bytes=3-0", "bytes=", "", "bytes=x-3", "BYTES=0-3", "bytes=0-3,",
        "bytes=0-1,2-3", "bytes=+0-3", "bytes=0--3", "bytes=0-3-5",
        f"bytes={SIZE}-{SIZE + 4}",
    )),
    get_range("range-trailing-space", "bytes=0-3 ", status=416, diskferry=206),
    get_range("range-trailing-tab", "bytes=0-3\t", status=416, diskferry=206),
    get_range("range-ends-past-image", f"bytes={SIZE - 1}-{SIZE}", status=416,
              diskferry=206),
    Row("range-twice", "GET", "", ("Range: bytes=0-1", "Range: bytes=2-3"),
        status=206, diskferry=416),
    # Content-Length on PUT.
    # diskferry closes after a Content-Length it cannot trust: the
    # stream can no longer be framed.
    Row("cl-missing", "PUT", "?flush=n", (), status=400, body=b"",
        diskferry_closes=True),
    *(Row(f"cl={v!r}", "PUT", "?flush=n", (f"Content-Length: {v}",),
          status=400, body=b"", diskferry_closes=True)
      for v in ("", "4,4", "-1", "0x4")),
    Row("cl-spaces", "PUT", "?flush=n", ("Content-Length:  4 ",)),
    Row("cl-plus", "PUT", "?flush=n", ("Content-Length: +4",), diskferry=400,
        diskferry_closes=True),
    Row("cl-twice-differ", "PUT", "?flush=n",
        ("Content-Length: 4", "Content-Length: 5"), diskferry=400,
        diskferry_closes=True),
    # Other headers.
    put("expect-unknown", headers=("Expect: x-foo",)),
    Row("connection-close", "GET", "", ("Range: bytes=0-1", "Connection: close"),
        206, closes=True),
]

@pytest.fixture
def image(tmp_path):
    return make_sparse_file(tmp_path / "image.raw", SIZE, {0: FILL * SIZE})


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_request_table(endpoint, image, make_ticket, row):
    kind = endpoint.server.name
    t = make_ticket(endpoint.server, image, SIZE)
    if row.body is not None:
        body = row.body
    elif row.method == "PATCH":
        body = b'{"op":"flush"}'
    else:
        body = BODY if row.method == "PUT" else b""
    path = f"/images/{t['uuid']}"
    head = (f"{row.method} {path}{row.target} HTTP/1.1\r\n"
            "Host: localhost\r\n" + "".join(h + "\r\n" for h in row.headers))
    with endpoint.raw() as con:
        con.send(head.encode() + b"\r\n" + body)
        res = con.response(row.method)
        assert res.status == row.expected(kind), res
        if row.expected_close(kind):
            assert con.at_eof(timeout=5)
            assert (res.header("Connection") or "").lower() == "close" or \
                row.name == "connection-close"
        else:
            # Still open, and in step: the next request is answered.
            assert con.request("OPTIONS", path).status == 200
    if row.method == "PUT":
        content = open(image, "rb").read()
        if res.status == 200:
            end = row.offset + len(BODY)
            assert content[row.offset:end] == BODY
            assert content[:row.offset] + content[end:] == FILL * (SIZE - 4)
        else:
            assert content == FILL * SIZE
