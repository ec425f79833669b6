"""Fixtures for client tests (helpers live in ``helpers.py``)."""

import os
import shutil
import subprocess

import pytest

from .helpers import CuttingRelay


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
