"""The client's own qemu-nbd is ready only once it serves the image.

qemu-nbd binds its socket before it opens the image: an image it cannot
open (here one another qemu-nbd holds) must fail ``QemuNbd()`` with qemu's
reason, not the copy's first request.
"""

from __future__ import annotations

import socket

import pytest

from diskferry.client import formats
from diskferry.client.qemunbd import QemuNbd, QemuNbdError
from nbd_servers import qemu_img

MiB = 1 << 20


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.qcow2"
    qemu_img("create", "-f", "qcow2", path, 4 * MiB)
    return str(path)


def test_ready_means_serving(image):
    source = formats.open_source(image, "qcow2")
    with QemuNbd(source.spec, read_only=True, shared=1) as server:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(server.socket_path)
            assert s.recv(8) == b"NBDMAGIC"


def test_an_image_it_cannot_open_fails_at_start(image):
    """The first server holds the image's write lock: the second binds
    its socket, then cannot open the image."""
    source = formats.open_source(image, "qcow2")
    with QemuNbd(source.spec, read_only=False, shared=1):
        for _ in range(20):
            with pytest.raises(QemuNbdError) as e:
                QemuNbd(source.spec, read_only=False, shared=1).close()
            assert "lock" in str(e.value), e.value
