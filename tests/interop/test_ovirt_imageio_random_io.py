"""Interop: random I/O with ovirt_imageio.client.ImageioClient.

The client opens the transfer URL, reads OPTIONS, switches to the UNIX
socket when it can, and then reads, writes, zeroes, flushes and asks for
extents at arbitrary offsets.  Every result is checked against the image
file on disk.  Run against both daemons; ovirt-imageio proves the test.
"""

from __future__ import annotations

import os

import pytest
from ovirt_imageio import client

from servers import make_sparse_file, ticket_dict

MiB = 1 << 20
SIZE = 8 * MiB

VARIANTS = [(k, v) for k in ("ovirt-imageio", "diskferry") for v in ("tls", "unix")]
IDS = [f"{k}-{v}" for k, v in VARIANTS]


@pytest.fixture(params=VARIANTS, ids=IDS)
def transfer(request, daemons, tmp_path):
    kind, variant = request.param
    srv = daemons.get(kind, local_socket="abstract" if variant == "unix" else None)
    original = os.urandom(2 * MiB)
    image = make_sparse_file(tmp_path / "image.raw", SIZE, {MiB: original})
    t = ticket_dict(image, SIZE, ["read", "write"])
    srv.add_ticket(t)
    yield srv, image, srv.image_url(t["uuid"]), original
    srv.control("DELETE", f"/tickets/{t['uuid']}")


def test_random_io(transfer):
    srv, image, url, original = transfer
    c = client.ImageioClient(url, cafile=srv.ca_file)
    try:
        assert c.size() == SIZE
        assert c.max_readers >= 1
        assert c.max_writers >= 1

        buf = bytearray(4096)
        c.read(MiB + 100, buf)
        assert bytes(buf) == original[100:4196]

        data = os.urandom(300_000)
        c.write(5 * MiB + 7, data)
        c.zero(MiB + 4096, 64 * 1024)
        c.flush()

        buf = bytearray(len(data))
        c.read(5 * MiB + 7, buf)
        assert bytes(buf) == data

        extents = list(c.extents())
        assert extents[0].start == 0
        assert sum(e.length for e in extents) == SIZE
        for a, b in zip(extents, extents[1:], strict=False):
            assert a.start + a.length == b.start
    finally:
        c.close()

    content = image.read_bytes()
    assert content[5 * MiB + 7 : 5 * MiB + 7 + len(data)] == data
    assert content[MiB + 4096 : MiB + 4096 + 64 * 1024] == bytes(64 * 1024)
    assert content[MiB : MiB + 4096] == original[:4096]
    assert content[MiB + 4096 + 64 * 1024 : 3 * MiB] == original[4096 + 64 * 1024 :]
    assert content[:MiB] == bytes(MiB)
