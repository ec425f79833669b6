"""Conformance: a request wrong in itself is refused before its image is
opened, and before its ticket is looked up.

Two tickets make the difference visible: one whose image file was
removed after the ticket was installed (storage gone: opening it fails,
a 500), and one that was never installed (a 403). ovirt-imageio 2.5.1
checks a PUT's ``Content-Length``, ``Content-Range`` and ``flush``, a
PATCH's JSON body and a checksum's query, and a GET's ``Range`` syntax,
before the ticket: each is a 400 (416 for ``Range``) naming what is
wrong, whatever the ticket. A 500 there would mislead a client, for
which a 500 on PUT means "resend what you sent since your last flush".

Where diskferry answers otherwise, deliberately (docs/protocol.md):

- a ``Range`` on GET is checked against the ticket's size, which its 416
  names (``Content-Range: bytes */SIZE``): on an unknown ticket, 403;
- every check diskferry can make without the image comes before opening
  it: a range past the ticket (PUT, PATCH zero, GET) is a 416, dirty
  extents of a ticket without ``dirty`` a 404, a bad ``context``,
  ``start`` or ``length`` of extents a 400 (before the ticket too), where
  ovirt-imageio opens the image first and answers 500 (403 for an
  unknown ticket and a bad ``context``);
- a PATCH body that is JSON but not an object: 400 (ovirt-imageio 500).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import pytest

from servers import RawConnection, make_sparse_file

SIZE = 1 << 20


def ask(method, target="", headers=(), body=b""):
    """The head after ``/images/{id}``, and the body, of a request."""
    lines = "".join(h + "\r\n" for h in headers)
    return method, f"{target} HTTP/1.1\r\nHost: localhost\r\n{lines}\r\n", body


@dataclass(frozen=True)
class Case:
    name: str
    request: tuple[str, str, bytes]
    status: int = 400
    # A word the answer's body has (the header, parameter or field).
    names: str = ""
    # Answers where a daemon and a ticket ("gone", "unknown") differ from
    # ``status``, by "KIND TICKET".
    answers: dict[str, int] = field(default_factory=dict)

    def expected(self, kind: str, ticket: str) -> int:
        return self.answers.get(f"{kind} {ticket}", self.status)


def put(name, value=None, target="?flush=n", **kw):
    headers = ("Content-Length: 4",)
    if value is not None:
        headers += (f"Content-Range: {value}",)
    return Case(name, ask("PUT", target, headers, b"abcd"), **kw)


def patch(name, msg, **kw):
    body = msg if isinstance(msg, bytes) else json.dumps(msg).encode()
    headers = ("Content-Type: application/json", f"Content-Length: {len(body)}")
    return Case(name, ask("PATCH", "", headers, body), **kw)


def get(name, target="", headers=(), **kw):
    return Case(name, ask("GET", target, headers), **kw)


#: Where a range past the ticket meets a ticket whose image is gone.
PAST_TICKET = {"diskferry gone": 416, "diskferry unknown": 403,
               "ovirt-imageio unknown": 403}

CASES = [
    Case("put-no-content-length", ask("PUT", "?flush=n"),
         names="Content-Length"),
    put("put-flush-invalid", target="?flush=invalid", names="flush"),
    *(put(f"put-content-range={v!r}", v, names="Content-Range") for v in (
        "", "   ", "7-13/20", "bytes 13-7/20", "bytes 7-13",
        "bytes 7-13/invalid",
    )),
    patch("patch-unknown-op", {"op": "nope"}, names="op"),
    patch("patch-no-op", {"size": 1}, names="op"),
    patch("patch-size-not-int", {"op": "zero", "size": "x"}),
    patch("patch-offset-negative", {"op": "zero", "size": 1, "offset": -1}),
    patch("patch-flush-not-bool", {"op": "zero", "size": 1, "flush": "x"}),
    patch("patch-not-json", b"{x", names="JSON"),
    get("checksum-algorithm", "/checksum?algorithm=nope", names="'algorithm'"),
    get("checksum-block-size", "/checksum?block_size=x", names="block"),
    get("get-range-malformed", "", ("Range: bytes=x-3",), status=416,
        names="Range", answers={"diskferry unknown": 403}),
    # Where diskferry checks more before opening the image.
    patch("patch-not-object", b"[]", status=500,
          answers={"diskferry gone": 400, "diskferry unknown": 400}),
    get("extents-context", "/extents?context=nope",
        answers={"ovirt-imageio gone": 500, "ovirt-imageio unknown": 403}),
    # start is an extension, which ovirt-imageio does not read.
    get("extents-start", "/extents?start=x", names="start",
        answers={"ovirt-imageio gone": 500, "ovirt-imageio unknown": 403}),
    put("put-past-ticket", f"bytes {SIZE - 1}-{SIZE + 2}/*", status=500,
        answers=PAST_TICKET),
    patch("patch-zero-past-ticket", {"op": "zero", "offset": SIZE, "size": 1},
          status=500, answers=PAST_TICKET),
    get("get-range-past-ticket", "", (f"Range: bytes={SIZE}-",), status=500,
        answers=PAST_TICKET),
    get("extents-dirty", "/extents?context=dirty", status=500,
        answers={**PAST_TICKET, "diskferry gone": 404}),
]


@pytest.fixture
def gone_ticket(server, make_ticket, tmp_path):
    """A ticket whose image was removed after it was installed."""
    path = make_sparse_file(tmp_path / "gone.raw", SIZE)
    ticket = make_ticket(server, path, SIZE)
    os.unlink(path)
    return ticket["uuid"]


@pytest.mark.parametrize("ticket", ["gone", "unknown"])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_request_checked_before_image(server, gone_ticket, case, ticket):
    ticket_id = gone_ticket if ticket == "gone" else "no-such-ticket"
    method, head, body = case.request
    with RawConnection(server.raw_local_socket(timeout=10)) as con:
        con.send(f"{method} /images/{ticket_id}{head}".encode() + body)
        res = con.response(method)
    expected = case.expected(server.name, ticket)
    assert res.status == expected, res.body
    if expected in (400, 416) and case.names:
        assert case.names.lower().encode() in res.body.lower(), res.body
    assert res.header("Content-Type").startswith("text/plain")



def test_image_that_cannot_be_opened_names_the_cause(daemons, make_ticket,
                                                      tmp_path):
    """A well-formed request on a ticket whose file is gone: diskferry's
    500 says why (the system's words), not where (the path is the
    daemon's). ovirt-imageio's says neither."""
    server = daemons.get("diskferry")
    path = make_sparse_file(tmp_path / "gone.raw", SIZE)
    ticket = make_ticket(server, path, SIZE)
    os.unlink(path)
    with RawConnection(server.raw_local_socket(timeout=10)) as con:
        con.send(f"GET /images/{ticket['uuid']} HTTP/1.1\r\n"
                 f"Host: localhost\r\n\r\n".encode())
        res = con.response("GET")
    assert res.status == 500
    assert b"Cannot open the image" in res.body
    assert b"No such file or directory" in res.body
    assert b"gone.raw" not in res.body
