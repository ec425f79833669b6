"""Conformance: CORS headers on the images API, as ovirt-imageio 2.5.1.

Every row was observed on ovirt-imageio 2.5.1 first (docs/protocol.md,
CORS): which answers carry which ``Access-Control-*`` headers, for which
request headers, errors included. Both daemons must answer each row
alike, over TLS and both UNIX sockets; the control service never has
CORS.
"""

from __future__ import annotations

import json

import pytest

from servers import make_sparse_file

SIZE = 1 << 20
ORIGIN = {"Origin": "https://portal.example"}
ACRM = {"Access-Control-Request-Method": "PUT"}
ACRH = {"Access-Control-Request-Headers": "content-range, content-type"}
PREFLIGHT = {**ORIGIN, **ACRM, **ACRH}

ALLOW_ORIGIN = ("Access-Control-Allow-Origin", "*")
ALLOW_HEADERS = ("Access-Control-Allow-Headers", "*")
MAX_AGE = ("Access-Control-Max-Age", "86400")


def methods(value):
    return ("Access-Control-Allow-Methods", value)


# (name, method, path: {rw} {ro} or a literal, request headers, body,
#  status, the CORS headers of the answer)
ROWS = [
    ("preflight", "OPTIONS", "{rw}", PREFLIGHT, b"", 200,
     [ALLOW_ORIGIN, ALLOW_HEADERS, methods("OPTIONS,GET,PUT"), MAX_AGE]),
    ("preflight-read-only", "OPTIONS", "{ro}", PREFLIGHT, b"", 200,
     [ALLOW_ORIGIN, ALLOW_HEADERS, methods("OPTIONS,GET,PUT"), MAX_AGE]),
    ("preflight-star", "OPTIONS", "*", {**ORIGIN, **ACRM}, b"", 200,
     [ALLOW_ORIGIN, methods("OPTIONS,GET,PUT"), MAX_AGE]),
    ("preflight-unknown-ticket", "OPTIONS", "nosuch", PREFLIGHT, b"", 403,
     [ALLOW_ORIGIN, ALLOW_HEADERS, methods("OPTIONS,GET,PUT"), MAX_AGE]),
    ("preflight-patch", "OPTIONS", "{rw}",
     {**ORIGIN, "Access-Control-Request-Method": "PATCH"}, b"", 200,
     [ALLOW_ORIGIN, methods("OPTIONS,GET,PUT"), MAX_AGE]),
    ("options-origin-only", "OPTIONS", "{rw}", ORIGIN, b"", 200,
     [ALLOW_ORIGIN, MAX_AGE]),
    ("options-method-only", "OPTIONS", "{rw}", ACRM, b"", 200,
     [methods("OPTIONS,GET,PUT"), MAX_AGE]),
    ("options-headers-only", "OPTIONS", "{rw}", ACRH, b"", 200,
     [ALLOW_HEADERS, MAX_AGE]),
    ("options-none", "OPTIONS", "{rw}", {}, b"", 200, []),
    ("options-empty-values", "OPTIONS", "{rw}",
     {"Origin": "", "Access-Control-Request-Method": "",
      "Access-Control-Request-Headers": ""}, b"", 200, []),
    ("options-null-origin", "OPTIONS", "{rw}", {"Origin": "null"}, b"", 200,
     [ALLOW_ORIGIN, MAX_AGE]),
    ("get", "GET", "{rw}", {**ORIGIN, "Range": "bytes=0-3"}, b"", 206,
     [ALLOW_ORIGIN, MAX_AGE]),
    ("get-no-origin", "GET", "{rw}", {"Range": "bytes=0-3"}, b"", 206, []),
    ("get-with-request-method", "GET", "{rw}",
     {**PREFLIGHT, "Range": "bytes=0-3"}, b"", 206,
     [ALLOW_ORIGIN, ALLOW_HEADERS, methods("*"), MAX_AGE]),
    ("get-unknown-ticket", "GET", "nosuch", ORIGIN, b"", 403,
     [ALLOW_ORIGIN, MAX_AGE]),
    ("get-416", "GET", "{rw}", {**ORIGIN, "Range": f"bytes={SIZE}-{SIZE + 4}"},
     b"", 416,
     [ALLOW_ORIGIN, MAX_AGE]),
    ("put", "PUT", "{rw}", {**ORIGIN, "Content-Range": "bytes 0-3/*"}, b"abcd",
     200, [ALLOW_ORIGIN, MAX_AGE]),
    ("put-read-only", "PUT", "{ro}", ORIGIN, b"abcd", 403,
     [ALLOW_ORIGIN, MAX_AGE]),
    ("put-bad-range", "PUT", "{rw}", {**ORIGIN, "Content-Range": "bytes x-3/*"},
     b"abcd", 400, [ALLOW_ORIGIN, MAX_AGE]),
    ("patch", "PATCH", "{rw}",
     {**ORIGIN, "Content-Type": "application/json"}, b'{"op":"flush"}', 200,
     []),
    ("patch-unknown-ticket", "PATCH", "nosuch",
     {**ORIGIN, "Content-Type": "application/json"}, b'{"op":"flush"}', 403,
     []),
    ("extents", "GET", "{rw}/extents", ORIGIN, b"", 200, []),
    ("checksum", "GET", "{rw}/checksum", ORIGIN, b"", 200, []),
    ("no-ticket", "GET", "", ORIGIN, b"", 400, [ALLOW_ORIGIN, MAX_AGE]),
    ("no-ticket-preflight", "OPTIONS", "", {**ORIGIN, **ACRM}, b"", 400,
     [ALLOW_ORIGIN, methods("OPTIONS,GET,PUT"), MAX_AGE]),
    ("delete-405", "DELETE", "{rw}", ORIGIN, b"", 405, []),
    ("unknown-path-404", "GET", "/nothing", ORIGIN, b"", 404, []),
]


@pytest.fixture
def tickets(endpoint, tmp_path, make_ticket):
    rw = make_sparse_file(tmp_path / "rw.raw", SIZE, {0: b"c" * SIZE})
    ro = make_sparse_file(tmp_path / "ro.raw", SIZE, {0: b"r" * SIZE})
    return (make_ticket(endpoint.server, rw, SIZE)["uuid"],
            make_ticket(endpoint.server, ro, SIZE, ops=["read"])["uuid"])


def cors_headers(res):
    return sorted((k.lower(), v) for k, v in res.headers
                  if k.lower().startswith("access-control-"))


@pytest.mark.parametrize("name,method,path,headers,body,status,expected", ROWS,
                         ids=[r[0] for r in ROWS])
def test_cors(endpoint, tickets, name, method, path, headers, body, status,
              expected):
    rw, ro = tickets
    if not path.startswith("/"):
        path = "/images/" + path.format(rw=rw, ro=ro)
    with endpoint.raw() as con:
        res = con.request(method, path, headers, body)
    assert res.status == status
    assert cors_headers(res) == sorted((k.lower(), v) for k, v in expected)


def test_info_cors(daemons):
    """``/info/`` of the remote service (where both daemons serve it)."""
    for kind in ("ovirt-imageio", "diskferry"):
        con = daemons.get(kind).remote_connection()
        try:
            con.request("GET", "/info/", headers={**ORIGIN, **ACRM})
            res = con.getresponse()
            res.read()
        finally:
            con.close()
        assert res.status == 200
        assert res.getheader("Access-Control-Allow-Origin") == "*"
        assert res.getheader("Access-Control-Allow-Methods") == "*"
        assert res.getheader("Access-Control-Max-Age") == "86400"


@pytest.mark.parametrize("method,path", [
    ("GET", "/tickets/{id}"), ("OPTIONS", "/tickets/{id}"),
    ("PUT", "/tickets/{id}"), ("GET", "/info/"),
])
def test_control_service_never_cors(server, tmp_path, make_ticket, method, path):
    image = make_sparse_file(tmp_path / "image.raw", SIZE)
    t = make_ticket(server, image, SIZE)
    body = json.dumps(t).encode() if method == "PUT" else None
    status, headers, _ = server.control(
        method, path.format(id=t["uuid"]), body, headers=PREFLIGHT)
    assert status < 500
    assert not [k for k in headers if k.lower().startswith("access-control-")]
