"""Conformance: PATCH (zero, flush), extents, checksum and /info/.

Observed in ovirt-imageio 2.5.1 beyond PROTOCOL.md:

- The file backend answers extents as a single data extent covering the
  whole image, holes included (``zero: false, hole: false``).  The
  conformance tests therefore check the structure of the answer and that
  every extent reported as zero really reads as zeros, not that holes are
  found; finding holes is tested on diskferry only.
- ``context=bogus`` on extents is a 400; ``context=dirty`` on a file ticket
  is a 404 with a text/plain body.
- PATCH ignores the Content-Type header (a JSON body sent as text/plain
  works).  A JSON body that is not an object (``[1]``) is a 500 in
  ovirt-imageio; PROTOCOL.md forbids a 500 for a bad request, so that case
  is tested on diskferry only (400).
- ``PATCH zero`` past the image end is a 416 with
  ``Content-Range: bytes */SIZE``.
- ``GET .../checksum`` accepts ``block_size`` only in [1 MiB, 16 MiB]
  (400 otherwise) and ``algorithm`` from hashlib's guaranteed set (400
  otherwise); a 403 for checksum of an unknown ticket does not close the
  connection.
- ovirt-imageio opens file images with O_DIRECT: any read of an image
  whose size is not a multiple of 512 that touches the tail (the
  checksum of such an image, for one) fails with a 500.  Checksum images
  here are sized in whole 4 KiB blocks.
- ``/info/`` is served on the remote (TCP) service only; on the local UNIX
  socket ovirt-imageio answers 404.  It is tested over TLS.
"""

from __future__ import annotations

import json
import os

import pytest

from servers import make_sparse_file

pytestmark = pytest.mark.all_storages

SIZE = 1 << 20
MiB = 1 << 20


def read_file(path, offset=0, length=None):
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read() if length is None else f.read(length)


@pytest.fixture
def image(tmp_path):
    return make_sparse_file(
        tmp_path / "image.raw",
        SIZE,
        {0: os.urandom(65536), 200 * 1024: os.urandom(100 * 1024)},
    )


def patch(con, tid, body):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return con.request(
        "PATCH", f"/images/{tid}", {"Content-Type": "application/json"}, data
    )


# --- PATCH -------------------------------------------------------------------


@pytest.mark.parametrize("sparse", [False, True], ids=["allocated", "sparse"])
@pytest.mark.parametrize("flush", [False, True], ids=["noflush", "flush"])
def test_zero(endpoint, image, make_ticket, sparse, flush):
    t = make_ticket(endpoint.server, image, SIZE, sparse=sparse)
    before = read_file(image)
    offset, length = 4096, 250 * 1024
    with endpoint.raw() as con:
        res = patch(
            con,
            t["uuid"],
            {"op": "zero", "offset": offset, "size": length, "flush": flush},
        )
        assert res.status == 200
        assert res.header("Content-Length") == "0"
        got = con.request(
            "GET",
            f"/images/{t['uuid']}",
            {"Range": f"bytes={offset}-{offset + length - 1}"},
        )
        assert got.status == 206
        assert got.body == bytes(length)
    after = read_file(image)
    assert len(after) == SIZE
    assert after[offset : offset + length] == bytes(length)
    assert after[:offset] == before[:offset]
    assert after[offset + length :] == before[offset + length :]


def test_zero_default_offset(endpoint, image, make_ticket):
    t = make_ticket(endpoint.server, image, SIZE)
    before = read_file(image)
    with endpoint.raw() as con:
        assert patch(con, t["uuid"], {"op": "zero", "size": 1000}).status == 200
    after = read_file(image)
    assert after[:1000] == bytes(1000)
    assert after[1000:] == before[1000:]


def test_zero_past_end_416(endpoint, image, make_ticket):
    t = make_ticket(endpoint.server, image, SIZE)
    before = read_file(image)
    with endpoint.raw() as con:
        res = patch(con, t["uuid"], {"op": "zero", "offset": SIZE - 10, "size": 20})
    assert res.status == 416
    assert res.header("Content-Range") == f"bytes */{SIZE}"
    assert read_file(image) == before


def test_flush(endpoint, image, make_ticket):
    t = make_ticket(endpoint.server, image, SIZE)
    with endpoint.raw() as con:
        res = con.request(
            "PUT",
            f"/images/{t['uuid']}?flush=n",
            {"Content-Range": "bytes 0-2/*"},
            b"abc",
        )
        assert res.status == 200
        res = patch(con, t["uuid"], {"op": "flush"})
        assert res.status == 200
        assert res.header("Content-Length") == "0"
    assert read_file(image, 0, 3) == b"abc"


def test_patch_content_type_not_required(endpoint, image, make_ticket):
    t = make_ticket(endpoint.server, image, SIZE)
    with endpoint.raw() as con:
        res = con.request(
            "PATCH",
            f"/images/{t['uuid']}",
            {"Content-Type": "text/plain"},
            b'{"op": "flush"}',
        )
    assert res.status == 200


@pytest.mark.parametrize(
    "body",
    [
        {"op": "bogus"},
        {},
        b"not json",
        b"",
        {"op": "zero"},
        {"op": "zero", "offset": 100},
        {"op": "zero", "size": -1},
        {"op": "zero", "size": 10, "offset": -1},
        {"op": "zero", "size": "10"},
        {"op": "zero", "size": 10, "flush": "x"},
    ],
    ids=[
        "unknown-op",
        "no-op",
        "bad-json",
        "empty",
        "no-size",
        "no-size-offset",
        "negative-size",
        "negative-offset",
        "string-size",
        "bad-flush",
    ],
)
def test_patch_bad_request_400(endpoint, image, make_ticket, body):
    t = make_ticket(endpoint.server, image, SIZE)
    before = read_file(image)
    with endpoint.raw() as con:
        res = patch(con, t["uuid"], body)
    assert res.status == 400
    assert res.header("Content-Type").startswith("text/plain")
    assert int(res.header("Content-Length")) == len(res.body) > 0
    assert read_file(image) == before


def test_patch_read_only_403(endpoint, image, make_ticket):
    t = make_ticket(endpoint.server, image, SIZE, ops=["read"])
    before = read_file(image)
    with endpoint.raw() as con:
        res = patch(con, t["uuid"], {"op": "zero", "size": 4096})
        assert res.status == 403
        assert con.at_eof()
    assert read_file(image) == before


@pytest.mark.parametrize("kind", ["diskferry"])
@pytest.mark.parametrize("body", [b"[1]", b'"zero"', b"42", b"null"])
def test_ext_patch_json_not_object_400(daemons, kind, image, make_ticket, body):
    srv = daemons.get(kind)
    t = make_ticket(srv, image, SIZE)
    con = srv.remote_connection()
    try:
        con.request(
            "PATCH",
            f"/images/{t['uuid']}",
            body=body,
            headers={"Content-Type": "application/json"},
        )
        res = con.getresponse()
        res.read()
    finally:
        con.close()
    assert res.status == 400


# --- extents -----------------------------------------------------------------


def check_extents_structure(extents, size, keys):
    assert isinstance(extents, list) and extents
    pos = 0
    prev_flags = None
    for e in extents:
        assert set(e) == keys, e
        assert e["start"] == pos, extents
        assert e["length"] > 0, extents
        flags = tuple(e[k] for k in sorted(keys - {"start", "length"}))
        assert all(isinstance(f, bool) for f in flags)
        assert flags != prev_flags, f"adjacent extents not merged: {extents}"
        prev_flags = flags
        pos += e["length"]
    assert pos == size


@pytest.mark.parametrize("query", ["", "?context=zero"])
def test_extents_zero_context(endpoint, tmp_path, make_ticket, query):
    size = 4 * MiB
    image = make_sparse_file(
        tmp_path / "holes.raw",
        size,
        {0: os.urandom(4096), MiB: os.urandom(MiB), 3 * MiB + 4096: b"x" * 512},
    )
    t = make_ticket(endpoint.server, image, size, ops=["read"])
    with endpoint.raw() as con:
        res = con.request("GET", f"/images/{t['uuid']}/extents{query}")
        assert res.status == 200
        assert res.header("Content-Type") == "application/json"
        extents = res.json()
        check_extents_structure(extents, size, {"start", "length", "zero", "hole"})
        content = read_file(image)
        for e in extents:
            if e["hole"]:
                assert e["zero"], f"a hole must read as zeros: {e}"
            if e["zero"]:
                end = e["start"] + e["length"]
                assert content[e["start"] : end] == bytes(e["length"]), e
        # Data must never be reported as zero.
        for off in (0, MiB, 3 * MiB + 4096):
            covering = [
                e for e in extents if e["start"] <= off < e["start"] + e["length"]
            ]
            assert len(covering) == 1 and covering[0]["zero"] is False


def test_extents_after_writes_and_zero(endpoint, tmp_path, make_ticket):
    size = 2 * MiB
    image = make_sparse_file(tmp_path / "img.raw", size, {0: os.urandom(size)})
    t = make_ticket(endpoint.server, image, size, sparse=True)
    with endpoint.raw() as con:
        assert (
            patch(con, t["uuid"], {"op": "zero", "offset": MiB, "size": MiB}).status
            == 200
        )
        res = con.request("GET", f"/images/{t['uuid']}/extents")
        assert res.status == 200
        extents = res.json()
    check_extents_structure(extents, size, {"start", "length", "zero", "hole"})
    for e in extents:
        if e["start"] < MiB:
            assert e["zero"] is False, extents


def test_extents_dirty_on_file_ticket_404(endpoint, image, make_ticket):
    t = make_ticket(endpoint.server, image, SIZE)
    with endpoint.raw() as con:
        res = con.request("GET", f"/images/{t['uuid']}/extents?context=dirty")
        assert res.status == 404
        assert res.header("Content-Type").startswith("text/plain")
        assert int(res.header("Content-Length")) == len(res.body) > 0
        # The connection goes on.
        res = con.request("GET", f"/images/{t['uuid']}/extents")
        assert res.status == 200


def test_extents_bad_context_400(endpoint, image, make_ticket):
    t = make_ticket(endpoint.server, image, SIZE)
    with endpoint.raw() as con:
        res = con.request("GET", f"/images/{t['uuid']}/extents?context=bogus")
    assert res.status == 400
    assert res.header("Content-Type").startswith("text/plain")


def test_extents_unknown_ticket_403(endpoint):
    with endpoint.raw() as con:
        res = con.request("GET", "/images/no-such-ticket/extents")
    assert res.status == 403


@pytest.mark.file_only  # a raw file's holes; NBD holes: tests/test_nbd_tickets.py
@pytest.mark.parametrize("kind", ["diskferry"])
def test_ext_extents_report_holes(daemons, kind, tmp_path, make_ticket):
    srv = daemons.get(kind)
    size = 8 * MiB
    image = make_sparse_file(
        tmp_path / "holes.raw", size, {0: os.urandom(MiB), 6 * MiB: os.urandom(MiB)}
    )
    t = make_ticket(srv, image, size, ops=["read"])
    with servers_raw(srv) as con:
        res = con.request("GET", f"/images/{t['uuid']}/extents")
    assert res.status == 200
    extents = res.json()
    check_extents_structure(extents, size, {"start", "length", "zero", "hole"})
    # The 5 MiB hole in the middle is reported as a zero hole.
    mid = 3 * MiB
    covering = [e for e in extents if e["start"] <= mid < e["start"] + e["length"]]
    assert covering[0]["zero"] is True and covering[0]["hole"] is True
    assert (
        covering[0]["start"] <= MiB
        and covering[0]["start"] + covering[0]["length"] >= 6 * MiB
    )


def servers_raw(srv):
    import servers

    return servers.RawConnection(srv.raw_remote_socket())


@pytest.mark.parametrize("kind", ["diskferry"])
@pytest.mark.parametrize(
    "start,length",
    [(0, MiB), (MiB // 2, 3 * MiB), (5 * MiB, 3 * MiB), (4096, 1), (7 * MiB, MiB)],
)
def test_ext_extents_start_length(daemons, kind, tmp_path, make_ticket, start, length):
    srv = daemons.get(kind)
    size = 8 * MiB
    image = make_sparse_file(
        tmp_path / "holes.raw", size, {0: os.urandom(MiB), 6 * MiB: os.urandom(MiB)}
    )
    t = make_ticket(srv, image, size, ops=["read"])
    with servers_raw(srv) as con:
        whole = con.request("GET", f"/images/{t['uuid']}/extents").json()
        res = con.request(
            "GET", f"/images/{t['uuid']}/extents?start={start}&length={length}"
        )
    assert res.status == 200
    part = res.json()
    assert part[0]["start"] == start
    end = start + length
    pos = start
    for e in part:
        assert e["start"] == pos
        pos += e["length"]
    assert pos == end
    # The part agrees with the whole answer, clipped.
    for e in part:
        covering = [
            w for w in whole if w["start"] <= e["start"] < w["start"] + w["length"]
        ]
        assert covering[0]["zero"] == e["zero"] and covering[0]["hole"] == e["hole"]


@pytest.mark.parametrize("kind", ["diskferry"])
@pytest.mark.parametrize(
    "query", [f"start={SIZE}&length=1", f"start=0&length={SIZE + 1}"]
)
def test_ext_extents_range_past_end_416(daemons, kind, image, make_ticket, query):
    srv = daemons.get(kind)
    t = make_ticket(srv, image, SIZE, ops=["read"])
    with servers_raw(srv) as con:
        res = con.request("GET", f"/images/{t['uuid']}/extents?{query}")
    assert res.status == 416


# --- checksum ----------------------------------------------------------------


def test_checksum_default(endpoint, image, make_ticket):
    t = make_ticket(endpoint.server, image, SIZE, ops=["read"])
    with endpoint.raw() as con:
        res = con.request("GET", f"/images/{t['uuid']}/checksum")
    assert res.status == 200
    assert res.header("Content-Type") == "application/json"
    body = res.json()
    assert body["algorithm"] == "blake2b"
    assert body["block_size"] == 4 * MiB
    assert len(body["checksum"]) == 64
    int(body["checksum"], 16)


def test_checksum_algorithms(endpoint, image, make_ticket):
    t = make_ticket(endpoint.server, image, SIZE, ops=["read"])
    with endpoint.raw() as con:
        res = con.request("GET", f"/images/{t['uuid']}/checksum/algorithms")
    assert res.status == 200
    algorithms = res.json()["algorithms"]
    assert {"blake2b", "sha1", "sha256", "md5"} <= set(algorithms)
    assert algorithms == sorted(algorithms)


def test_checksum_follows_content(endpoint, image, make_ticket):
    t = make_ticket(endpoint.server, image, SIZE)
    with endpoint.raw() as con:
        first = con.request("GET", f"/images/{t['uuid']}/checksum").json()
        again = con.request("GET", f"/images/{t['uuid']}/checksum").json()
        res = con.request(
            "PUT",
            f"/images/{t['uuid']}",
            {"Content-Range": "bytes 500000-500000/*"},
            b"!",
        )
        assert res.status == 200
        changed = con.request("GET", f"/images/{t['uuid']}/checksum").json()
    assert first == again
    assert changed["checksum"] != first["checksum"]


@pytest.mark.parametrize(
    "query",
    ["algorithm=bogus", "block_size=x", "block_size=1000", "block_size=1073741824"],
)
def test_checksum_bad_params_400(endpoint, image, make_ticket, query):
    t = make_ticket(endpoint.server, image, SIZE, ops=["read"])
    with endpoint.raw() as con:
        res = con.request("GET", f"/images/{t['uuid']}/checksum?{query}")
    assert res.status == 400
    assert res.header("Content-Type").startswith("text/plain")


def test_checksum_unknown_ticket_403(endpoint):
    with endpoint.raw() as con:
        res = con.request("GET", "/images/no-such-ticket/checksum")
    assert res.status == 403


CHECKSUM_QUERIES = [
    "",
    "algorithm=sha1",
    "algorithm=sha256&block_size=1048576",
    "algorithm=blake2b&block_size=16777216",
    "algorithm=md5&block_size=2097152",
    "algorithm=blake2s",
]


@pytest.fixture(scope="module")
def checksum_images(tmp_path_factory):
    """Images whose content exercises blkhash's cases: data blocks, holes,
    allocated zero blocks, and a partial last block.  Sizes are multiples of
    4096: ovirt-imageio reads with O_DIRECT and fails (500) on an image whose
    size is not a multiple of the sector size."""
    d = tmp_path_factory.mktemp("checksum")
    size = 9 * MiB + 3 * 4096
    data = {
        0: os.urandom(MiB),
        3 * MiB: bytes(MiB),  # allocated zeros
        5 * MiB + 17: os.urandom(3000),
        9 * MiB + 4096: os.urandom(2 * 4096),
    }
    return {
        "mixed": (make_sparse_file(d / "mixed.raw", size, data), size),
        "empty": (make_sparse_file(d / "empty.raw", 6 * MiB), 6 * MiB),
        "zeros": (
            make_sparse_file(d / "zeros.raw", 6 * MiB, {0: bytes(6 * MiB)}),
            6 * MiB,
        ),
        "small": (make_sparse_file(d / "small.raw", 8192, {0: b"s" * 1000}), 8192),
    }


def checksum_of(srv, ticket_id, query):
    con = srv.remote_connection()
    try:
        con.request("GET", f"/images/{ticket_id}/checksum?{query}")
        res = con.getresponse()
        body = res.read()
    finally:
        con.close()
    assert res.status == 200, body
    return json.loads(body)


@pytest.mark.parametrize("name", ["mixed", "empty", "zeros", "small"])
@pytest.mark.parametrize("query", CHECKSUM_QUERIES)
def test_checksum_same_on_both_servers(
    daemons, checksum_images, make_ticket, name, query
):
    image, size = checksum_images[name]
    answers = {}
    for kind in ("ovirt-imageio", "diskferry"):
        srv = daemons.get(kind)
        t = make_ticket(srv, image, size, ops=["read"])
        answers[kind] = checksum_of(srv, t["uuid"], query)
    assert answers["diskferry"] == answers["ovirt-imageio"]


def test_checksum_ignores_allocation(server, checksum_images, make_ticket):
    sums = []
    for name in ("empty", "zeros"):
        image, size = checksum_images[name]
        t = make_ticket(server, image, size, ops=["read"])
        sums.append(checksum_of(server, t["uuid"], "")["checksum"])
    assert sums[0] == sums[1]


# --- info --------------------------------------------------------------------


def test_info(server):
    con = server.remote_connection()
    try:
        con.request("GET", "/info/")
        res = con.getresponse()
        body = res.read()
    finally:
        con.close()
    assert res.status == 200
    assert res.headers["Content-Type"] == "application/json"
    info = json.loads(body)
    assert isinstance(info["version"], str) and info["version"]


def allocated(path) -> int:
    return os.stat(path).st_blocks * 512


@pytest.mark.parametrize("kind", ["diskferry"])
@pytest.mark.parametrize("sparse", [True, False], ids=["sparse", "allocated"])
def test_ext_zero_deallocates_only_on_sparse_ticket(
    daemons, kind, tmp_path, make_ticket, sparse, storage
):
    """Over NBD: WRITE_ZEROES without NO_HOLE on a sparse ticket, with it
    otherwise; a raw export reports no holes, only zeros."""
    srv = daemons.get(kind)
    size = 4 * MiB
    image = make_sparse_file(tmp_path / "img.raw", size, {0: os.urandom(size)})
    os.sync()
    t = make_ticket(srv, image, size, sparse=sparse)
    before = allocated(image)
    assert before >= size
    with servers_raw(srv) as con:
        res = patch(con, t["uuid"], {"op": "zero", "offset": MiB, "size": 2 * MiB})
        assert res.status == 200
        extents = con.request("GET", f"/images/{t['uuid']}/extents").json()
    assert read_file(image, MiB, 2 * MiB) == bytes(2 * MiB)
    mid = [e for e in extents if e["start"] <= 2 * MiB < e["start"] + e["length"]]
    if sparse:
        assert allocated(image) <= before - 2 * MiB
        assert mid[0]["zero"] is True
        assert mid[0]["hole"] is (storage == "file")
    else:
        assert allocated(image) >= before
