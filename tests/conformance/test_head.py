"""Conformance: HEAD on /images/{id} and Accept-Ranges on GET.

Observed in ovirt-imageio 2.5.1: HEAD on an image is a 405 whose body is
sent anyway (the connection is out of step after it, so these tests send
ovirt-imageio's next request on a new connection), and GET answers have
no ``Accept-Ranges``. diskferry answers HEAD as GET would be answered,
without the body, so that generic HTTP clients (qemu's curl driver,
nbdkit-curl-plugin, resuming downloaders) can read an image
(docs/protocol.md); each test asserts both daemons' behaviour.
"""

from __future__ import annotations

import pytest

from servers import make_sparse_file

pytestmark = pytest.mark.all_storages

SIZE = 1 << 20


@pytest.fixture
def image(tmp_path):
    return make_sparse_file(tmp_path / "image.raw", SIZE, {0: b"h" * 4096})


def is_diskferry(endpoint):
    return endpoint.server.name == "diskferry"


def head_then(endpoint, path, method, follow_path, headers=None, body=b""):
    """HEAD ``path``, then another request: on the same connection for
    diskferry (proving HEAD sent no body), on a new one for
    ovirt-imageio."""
    with endpoint.raw() as con:
        head = con.request("HEAD", path, headers)
        if is_diskferry(endpoint):
            return head, con.request(method, follow_path, body=body,
                                     headers=headers if method == "GET" else None)
    with endpoint.raw() as con:
        return head, con.request(method, follow_path, body=body)


@pytest.mark.parametrize("ops", [["read"], ["read", "write"], ["write"]])
def test_head_like_get_without_body(endpoint, image, make_ticket, ops):
    t = make_ticket(endpoint.server, image, SIZE, ops=ops, filename="disk.raw")
    path = f"/images/{t['uuid']}"
    with endpoint.raw() as con:
        head = con.request("HEAD", path)
        if not is_diskferry(endpoint):
            con = endpoint.raw()
        # diskferry: the same connection still frames the next answer,
        # HEAD sent no body bytes.
        with con:
            get = con.request("GET", path, {"Range": "bytes=0-3"})
    assert get.status == 206
    assert get.body == b"hhhh"
    if not is_diskferry(endpoint):
        assert head.status == 405
        assert get.header("Accept-Ranges") is None
        return
    assert head.status == 200
    assert head.header("Content-Length") == str(SIZE)
    assert head.header("Accept-Ranges") == "bytes"
    assert head.header("Content-Type") == "application/octet-stream"
    assert head.header("Content-Disposition") == get.header("Content-Disposition")
    assert head.header("Content-Disposition") == 'attachment; filename="disk.raw"'
    assert get.header("Accept-Ranges") == "bytes"


def test_get_whole_accept_ranges(endpoint, image, make_ticket):
    t = make_ticket(endpoint.server, image, SIZE, ops=["read"])
    with endpoint.raw() as con:
        res = con.request("GET", f"/images/{t['uuid']}")
    assert res.status == 200
    assert len(res.body) == SIZE
    expected = "bytes" if is_diskferry(endpoint) else None
    assert res.header("Accept-Ranges") == expected


def test_head_ignores_range(endpoint, image, make_ticket):
    t = make_ticket(endpoint.server, image, SIZE, ops=["read"])
    path = f"/images/{t['uuid']}"
    res, options = head_then(endpoint, path, "OPTIONS", path,
                             {"Range": "bytes=0-9"})
    assert options.status == 200
    if is_diskferry(endpoint):
        assert res.status == 200
        assert res.header("Content-Length") == str(SIZE)
        assert res.header("Content-Range") is None
    else:
        assert res.status == 405


def test_head_unknown_ticket_403_without_body(endpoint):
    with endpoint.raw() as con:
        res = con.request("HEAD", "/images/no-such-ticket")
        assert res.status == (403 if is_diskferry(endpoint) else 405)
        if is_diskferry(endpoint):
            # A body would show up here as bytes before EOF.
            assert con.at_eof(timeout=5)


def test_head_write_never_authorizes_put(endpoint, image, make_ticket):
    """HEAD needs only read: a read-only ticket answers it, and it
    does not open the way to PUT."""
    t = make_ticket(endpoint.server, image, SIZE, ops=["read"])
    path = f"/images/{t['uuid']}"
    _, res = head_then(endpoint, path, "PUT", path, body=b"x")
    assert res.status == 403


@pytest.mark.file_only
def test_head_of_short_image_is_storage_size(endpoint, tmp_path, make_ticket):
    """As GET, HEAD of an image shorter than its ticket gives the size
    the storage holds."""
    image = make_sparse_file(tmp_path / "short.raw", SIZE // 2, {0: b"s"})
    t = make_ticket(endpoint.server, image, SIZE, ops=["read"])
    path = f"/images/{t['uuid']}"
    head, get = head_then(endpoint, path, "GET", path)
    assert len(get.body) == SIZE // 2
    if is_diskferry(endpoint):
        assert head.header("Content-Length") == str(SIZE // 2)
    else:
        assert head.status == 405


def test_extents_head_405(endpoint, image, make_ticket):
    """HEAD is for the image itself; other resources answer 405, bodiless."""
    t = make_ticket(endpoint.server, image, SIZE, ops=["read"])
    path = f"/images/{t['uuid']}"
    res, options = head_then(endpoint, path + "/extents", "OPTIONS", path)
    assert options.status == 200
    assert res.status == 405
