"""Conformance: OPTIONS on the images API, over TLS and both UNIX sockets.

Observed in ovirt-imageio 2.5.1 beyond PROTOCOL.md:

- ``OPTIONS /images/*`` carries ``features`` and ``unix_socket`` but no
  ``max_readers``/``max_writers``.
- A 403 for an unknown ticket carries ``Connection: close`` and the
  server closes the connection.
- With the local service disabled, ``unix_socket`` is absent from both
  OPTIONS answers.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from diskferry import hostid
from servers import make_sparse_file

pytestmark = pytest.mark.all_storages

SIZE = 1 << 20
ALL_FEATURES = {"extents", "checksum", "zero", "flush"}


@pytest.fixture
def image(tmp_path):
    return make_sparse_file(tmp_path / "image.raw", SIZE, {0: b"x" * 4096})


def allow_set(res):
    return {m.strip() for m in res.header("Allow").split(",")}


def read_methods(server):
    """What Allow lists for reading: diskferry adds HEAD where GET is."""
    return {"OPTIONS", "GET"} | ({"HEAD"} if server.name == "diskferry" else set())


def test_write_ticket(endpoint, image, make_ticket, storage):
    t = make_ticket(endpoint.server, image, SIZE, ops=["read", "write"])
    with endpoint.raw() as con:
        res = con.request("OPTIONS", f"/images/{t['uuid']}")
    assert res.status == 200
    assert res.header("Content-Type") == "application/json"
    assert int(res.header("Content-Length")) == len(res.body)
    assert allow_set(res) == read_methods(endpoint.server) | {"PUT", "PATCH"}
    body = res.json()
    assert set(body["features"]) == ALL_FEATURES
    assert body["max_readers"] == 8
    # One writer for a file; an NBD export that allows several connections
    # (qemu-nbd --shared=8, nbdkit's file plugin) takes 8.
    assert body["max_writers"] == (1 if storage == "file" else 8)
    assert body["unix_socket"] == endpoint.server.local_socket


def test_read_only_ticket(endpoint, image, make_ticket):
    t = make_ticket(endpoint.server, image, SIZE, ops=["read"])
    with endpoint.raw() as con:
        res = con.request("OPTIONS", f"/images/{t['uuid']}")
    assert res.status == 200
    assert allow_set(res) == read_methods(endpoint.server)
    body = res.json()
    assert set(body["features"]) == {"extents", "checksum"}
    assert body["unix_socket"] == endpoint.server.local_socket
    assert body["max_readers"] >= 1


def test_star(endpoint):
    with endpoint.raw() as con:
        res = con.request("OPTIONS", "/images/*")
    assert res.status == 200
    assert allow_set(res) == read_methods(endpoint.server) | {"PUT", "PATCH"}
    body = res.json()
    assert set(body["features"]) == ALL_FEATURES
    assert body["unix_socket"] == endpoint.server.local_socket


def test_abstract_socket_advertised_with_nul(server):
    # The abstract address goes on the wire as JSON "\u0000...".
    con = server.remote_connection()
    try:
        con.request("OPTIONS", "/images/*")
        res = con.getresponse()
        raw = res.read()
    finally:
        con.close()
    assert res.status == 200
    assert b'"unix_socket": "\\u0000' in raw or b'"unix_socket":"\\u0000' in raw
    assert json.loads(raw)["unix_socket"].startswith("\0")


def test_unknown_ticket_403_closes(endpoint):
    with endpoint.raw() as con:
        res = con.request("OPTIONS", "/images/no-such-ticket")
        assert res.status == 403
        assert res.header("Content-Type").startswith("text/plain")
        assert int(res.header("Content-Length")) == len(res.body) > 0
        assert con.at_eof()


def test_canceled_ticket_403(endpoint, image, make_ticket):
    t = make_ticket(endpoint.server, image, SIZE)
    with endpoint.raw() as con:
        assert con.request("OPTIONS", f"/images/{t['uuid']}").status == 200
        endpoint.server.delete_ticket(t["uuid"])
        res = con.request("OPTIONS", f"/images/{t['uuid']}")
        assert res.status == 403
        assert con.at_eof()


@pytest.mark.parametrize("kind", ["ovirt-imageio", "diskferry"])
def test_no_local_service(daemons, kind, image, make_ticket):
    srv = daemons.get(kind, local_socket=None)
    assert srv.local_socket is None
    t = make_ticket(srv, image, SIZE)
    con = srv.remote_connection()
    try:
        for path in (f"/images/{t['uuid']}", "/images/*"):
            con.request("OPTIONS", path)
            res = con.getresponse()
            body = json.loads(res.read())
            assert res.status == 200
            assert "unix_socket" not in body
            assert "extents" in body["features"]
    finally:
        con.close()


# --- diskferry extensions ----------------------------------------------------


def raw_host_id() -> str:
    for p in ("/etc/vdsm/vdsm.id", "/etc/machine-id"):
        try:
            return Path(p).read_text().strip()
        except FileNotFoundError:
            continue
    raise AssertionError("neither /etc/vdsm/vdsm.id nor /etc/machine-id exists")


@pytest.mark.parametrize("kind", ["diskferry"])
def test_ext_host_and_server_id(daemons, kind, image, make_ticket):
    srv = daemons.get(kind)
    t = make_ticket(srv, image, SIZE)
    answers = []
    for con in (srv.remote_connection(), srv.local_connection()):
        try:
            con.request("OPTIONS", f"/images/{t['uuid']}")
            res = con.getresponse()
            assert res.status == 200
            answers.append(json.loads(res.read()))
        finally:
            con.close()
    remote, local = answers
    # The value a client on this host derives, never the id itself.
    assert remote["host_id"] == hostid.host_id()
    assert raw_host_id() not in json.dumps(remote).replace("-", "")
    assert local["host_id"] == remote["host_id"]
    assert isinstance(remote["server_id"], str) and remote["server_id"]
    assert local["server_id"] == remote["server_id"]


@pytest.mark.parametrize("kind", ["ovirt-imageio", "diskferry"])
def test_no_host_or_server_id_without_a_ticket(daemons, kind):
    """An unauthenticated client learns nothing about the host."""
    srv = daemons.get(kind)
    con = srv.remote_connection()
    try:
        con.request("OPTIONS", "/images/*")
        res = con.getresponse()
        body = json.loads(res.read())
    finally:
        con.close()
    assert res.status == 200
    assert "host_id" not in body and "server_id" not in body
    assert raw_host_id() not in json.dumps(body).replace("-", "")


@pytest.mark.parametrize("kind", ["diskferry"])
def test_ext_server_id_differs_between_daemons(daemons, kind, image, make_ticket):
    ids = []
    for local in ("abstract", "path"):
        srv = daemons.get(kind, local_socket=local)
        t = make_ticket(srv, image, SIZE)
        con = srv.remote_connection()
        try:
            con.request("OPTIONS", f"/images/{t['uuid']}")
            res = con.getresponse()
            assert res.status == 200
            ids.append(json.loads(res.read()).get("server_id"))
        finally:
            con.close()
    assert ids[0] and ids[1] and ids[0] != ids[1]


def test_write_only_ticket_implies_read(endpoint, image, make_ticket):
    t = make_ticket(endpoint.server, image, SIZE, ops=["write"])
    with endpoint.raw() as con:
        res = con.request("OPTIONS", f"/images/{t['uuid']}")
    assert res.status == 200
    assert allow_set(res) == read_methods(endpoint.server) | {"PUT", "PATCH"}
    assert set(res.json()["features"]) == ALL_FEATURES
