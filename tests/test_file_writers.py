"""Several connections writing one file image: ``[backend_file] max_writers``.

OPTIONS advertises the configured number (capped by ``[daemon]
max_connections``); connections that write distinct ranges at once,
their edges off any block and sharing blocks with their neighbours,
leave every byte where it was sent and nothing else changed, in
buffered and ``O_DIRECT`` mode, over the UNIX socket (spliced) and TLS
(through a buffer). ovirt-imageio 2.5.1 always says 1 for a regular file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import uuid

import pytest

import loopdev
import servers
from diskferry.client import upload
from diskferry.daemon import config

MiB = 1024**2
SIZE = 16 * MiB


@pytest.fixture(scope="module", params=[False, True], ids=["buffered", "direct"])
def writers_daemon(request, tmp_path_factory, pki):
    workdir = tmp_path_factory.mktemp("writers")
    with servers.start_server(
            "diskferry", workdir, pki=pki, local_socket="path",
            sections={"backend_file": {"max_writers": 4,
                                       "direct": request.param}}) as srv:
        yield srv


def add_ticket(srv, path, size=SIZE, **extra):
    t = servers.ticket_dict(path, size, uuid=str(uuid.uuid4()), **extra)
    srv.add_ticket(t)
    return t


def options(srv, ticket):
    con = srv.local_connection()
    try:
        con.request("OPTIONS", f"/images/{ticket['uuid']}")
        res = con.getresponse()
        assert res.status == 200
        return json.loads(res.read())
    finally:
        con.close()


def test_options_advertise_configured_writers(writers_daemon, tmp_path):
    image = servers.make_sparse_file(tmp_path / "disk.raw", SIZE)
    body = options(writers_daemon, add_ticket(writers_daemon, image))
    assert (body["max_readers"], body["max_writers"]) == (8, 4)


def test_max_connections_caps_writers(tmp_path_factory, tmp_path, pki):
    workdir = tmp_path_factory.mktemp("capped")
    image = servers.make_sparse_file(tmp_path / "disk.raw", SIZE)
    with servers.start_server(
            "diskferry", workdir, pki=pki, local_socket="path",
            daemon_options={"max_connections": 2},
            sections={"backend_file": {"max_writers": 6}}) as srv:
        body = options(srv, add_ticket(srv, image))
    assert (body["max_readers"], body["max_writers"]) == (2, 2)


@pytest.mark.parametrize("value,message", [
    (0, r"\[backend_file\] max_writers must be at least 1"),
    (-3, r"\[backend_file\] max_writers must be at least 1"),
    ("4", r"\[backend_file\] max_writers must be int"),
])
def test_bad_max_writers_is_named(tmp_path, value, message):
    path = tmp_path / "d.toml"
    path.write_text(f"[backend_file]\nmax_writers = {json.dumps(value)}\n")
    with pytest.raises(config.ConfigError, match=message):
        config.load(str(path))


def put(con, path, offset, data):
    con.request("PUT", f"{path}?flush=n", body=data, headers={
        "Content-Range": f"bytes {offset}-{offset + len(data) - 1}/*"})
    res = con.getresponse()
    body = res.read()
    assert res.status == 200, body


@pytest.fixture(params=["file", pytest.param("block", marks=pytest.mark.root)])
def image(request, tmp_path):
    """(path written through, path read back) of 16 MiB holding a pattern:
    a regular file, or a loop device over one."""
    backing = tmp_path / "disk.raw"
    backing.write_bytes(bytes(range(256)) * (SIZE // 256))
    if request.param == "file":
        yield backing, backing
        return
    with loopdev.attached(backing) as dev:
        yield dev, backing


@pytest.mark.parametrize("transport", ["local", "tls"])
def test_writers_at_once_keep_every_byte(writers_daemon, image, transport):
    """Four connections, each writing every fourth piece of 100,003 bytes
    (so that neighbours share a 4 KiB block at every edge) of the middle
    of an image filled with a pattern; the bytes around stay the pattern."""
    srv = writers_daemon
    target, backing = image
    before = backing.read_bytes()
    t = add_ticket(srv, target)
    path = f"/images/{t['uuid']}"
    start, piece, count = 12345, 100_003, 64
    payload = os.urandom(piece * count)
    connect = (srv.local_connection if transport == "local"
               else srv.remote_connection)
    barrier = threading.Barrier(4)
    errors = []

    def writer(first):
        con = connect()
        try:
            barrier.wait(timeout=30)
            for i in range(first, count, 4):
                put(con, path, start + i * piece,
                    payload[i * piece:(i + 1) * piece])
        except BaseException as e:  # reported by the main thread
            errors.append(e)
        finally:
            con.close()

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert not any(th.is_alive() for th in threads)
    assert not errors, errors
    con = connect()
    try:
        con.request("PATCH", path, body=b'{"op": "flush"}',
                    headers={"Content-Type": "application/json"})
        res = con.getresponse()
        res.read()
        assert res.status == 200
    finally:
        con.close()
    after = backing.read_bytes()
    end = start + len(payload)
    assert len(after) == SIZE
    assert after[:start] == before[:start]
    assert after[start:end] == payload
    assert after[end:] == before[end:]


def test_client_uploads_on_as_many_connections(writers_daemon, tmp_path):
    """The diskferry client takes the advertised writers: its PUTs come on
    four connections (the access log names each), and the copy is whole."""
    srv = writers_daemon
    source = tmp_path / "source.raw"
    source.write_bytes(os.urandom(SIZE))
    target = servers.make_sparse_file(tmp_path / "target.raw", SIZE)
    t = add_ticket(srv, target)
    shown = re.escape(t["uuid"][:4])
    mark = len(srv.log_text())
    upload(str(source), srv.image_url(t["uuid"]), cafile=srv.ca_file,
           workers=4, request_size=MiB)
    log = srv.log_text()[mark:]
    connections = set(re.findall(
        rf"\[local/(\d+)\] local PUT /images/{shown}\S* 200", log))
    assert len(connections) == 4, log[-2000:]
    assert (hashlib.sha256(target.read_bytes()).digest() ==
            hashlib.sha256(source.read_bytes()).digest())
