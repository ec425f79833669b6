"""Fixtures for client tests (helpers live in ``helpers.py``)."""

import os
import shutil
import subprocess

import pytest

import nbd_servers
from servers import ticket_dict

from .helpers import CuttingRelay, MiB

#: Size of the image behind ``slow_ticket``.
SLOW_SIZE = 8 * MiB


@pytest.fixture
def relay():
    """relay(server, cut_after, direction) -> CuttingRelay (closed at teardown)."""
    made = []

    def make(srv, cut_after, direction="up"):
        r = CuttingRelay((srv.host, srv.port), cut_after, direction)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


@pytest.fixture
def loop_device(tmp_path):
    """loop_device(size, content=None) -> path of a loop device over
    ``content`` (padded with zeros to ``size``), or over random data."""
    if os.geteuid() != 0 or shutil.which("losetup") is None:
        pytest.skip("loop devices need root and losetup")
    attached = []

    def make(size, content=None):
        backing = tmp_path / f"backing-{len(attached)}.raw"
        if content is None:
            content = os.urandom(size)
        backing.write_bytes(content.ljust(size, b"\0"))
        run = subprocess.run(["losetup", "--find", "--show", str(backing)],
                             capture_output=True, text=True)
        if run.returncode != 0:
            pytest.skip(f"cannot attach a loop device here: {run.stderr}")
        attached.append(run.stdout.strip())
        return attached[-1]

    yield make
    for dev in attached:
        subprocess.run(["losetup", "-d", dev], check=False)


@pytest.fixture
def slow_ticket(daemons, tmp_path):
    """A diskferry ticket whose storage answers each request after 50 ms
    (nbdkit's delay filter), so that a copy can be interrupted midway;
    its disk (``SLOW_SIZE`` random bytes) is ``tmp_path / "slow.raw"``."""
    srv = daemons.get("diskferry")
    disk = tmp_path / "slow.raw"
    disk.write_bytes(os.urandom(SLOW_SIZE))
    export = nbd_servers.start_export(
        "nbdkit", disk, filters=("delay",),
        params=("rdelay=50ms", "wdelay=50ms"))
    t = ticket_dict("/unused", SLOW_SIZE, ("read", "write"), url=export.url)
    srv.add_ticket(t)
    yield srv, srv.image_url(t["uuid"])
    export.stop()
