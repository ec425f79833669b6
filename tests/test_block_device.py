"""The daemon serving a real block device (a loop device) end to end."""

import hashlib
import os

import pytest

import loopdev
from servers import Endpoint

MiB = 1024**2
SIZE = 16 * MiB


@pytest.fixture
def loop_device(tmp_path):
    backing = tmp_path / "backing.raw"
    with open(backing, "wb") as f:
        f.write(os.urandom(SIZE))
    with loopdev.attached(backing) as dev:
        yield dev, backing


@pytest.mark.root
@pytest.mark.parametrize("transport", ["tls", "abstract"])
def test_block_device_roundtrip(daemons, make_ticket, loop_device, transport):
    dev, backing = loop_device
    endpoint = Endpoint(daemons.get("diskferry"), transport)
    t = make_ticket(endpoint.server, dev, SIZE, sparse=True)
    path = f"/images/{t['uuid']}"
    con = endpoint.connect()
    try:
        con.request("GET", path + "/extents")
        res = con.getresponse()
        assert res.status == 200
        assert res.read() == (
            b'[{"start": 0, "length": %d, "zero": false, "hole": false}]'
            % SIZE)

        data = os.urandom(MiB)
        con.request("PUT", path, body=data,
                    headers={"Content-Range": f"bytes {MiB}-{2 * MiB - 1}/*"})
        res = con.getresponse()
        assert res.status == 200, res.read()
        res.read()

        con.request("PATCH", path, body=(
            b'{"op": "zero", "offset": %d, "size": %d, "flush": true}'
            % (4 * MiB, 4 * MiB)), headers={"Content-Type": "application/json"})
        res = con.getresponse()
        assert res.status == 200, res.read()
        res.read()

        con.request("GET", path)
        res = con.getresponse()
        assert res.status == 200
        served = res.read()
    finally:
        con.close()
    on_disk = backing.read_bytes()
    assert served[MiB:2 * MiB] == data
    assert served[4 * MiB:8 * MiB] == b"\0" * 4 * MiB
    assert hashlib.sha256(served).digest() == hashlib.sha256(on_disk).digest()


@pytest.mark.root
@pytest.mark.parametrize("kind", ["diskferry", "ovirt-imageio"])
def test_block_device_takes_many_writers(daemons, make_ticket, loop_device,
                                         kind):
    """A block device is written by as many connections as read it, as
    ovirt-imageio 2.5.1 answers (a regular file: one, unless configured)."""
    dev, _ = loop_device
    endpoint = Endpoint(daemons.get(kind), "tls")
    t = make_ticket(endpoint.server, dev, SIZE)
    with endpoint.raw() as con:
        res = con.request("OPTIONS", f"/images/{t['uuid']}")
    assert res.status == 200
    body = res.json()
    assert (body["max_readers"], body["max_writers"]) == (8, 8)
