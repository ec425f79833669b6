"""Block devices on the client's side: source of an upload, destination
of a download (zero ranges must then be written, not skipped)."""

import pytest

from diskferry import client

from .helpers import MiB, empty_image, make_image

SIZE = 8 * MiB

pytestmark = pytest.mark.root


@pytest.mark.parametrize("unix", ["auto", "never"], ids=["unix", "tls"])
def test_download_to_block_device_zeroes_holes(daemons, make_ticket,
                                               loop_device, tmp_path, unix):
    srv = daemons.get("diskferry")
    content = make_image(tmp_path / "img.raw", SIZE, "sparse")
    ticket = make_ticket(srv, tmp_path / "img.raw", SIZE, ops=["read"])
    dev = loop_device(SIZE)  # full of random bytes

    result = client.download(srv.image_url(ticket["uuid"]), dev,
                             cafile=srv.ca_file, unix=unix)

    assert result.zero_bytes > 0
    with open(dev, "rb") as f:
        assert f.read() == content


def test_upload_from_block_device(daemons, make_ticket, loop_device,
                                  tmp_path):
    srv = daemons.get("diskferry")
    dev = loop_device(SIZE)
    target = empty_image(tmp_path / "target.raw", SIZE)
    ticket = make_ticket(srv, target, SIZE)

    result = client.upload(dev, srv.image_url(ticket["uuid"]),
                           cafile=srv.ca_file)

    assert result.data_bytes == SIZE
    with open(dev, "rb") as f:
        assert target.read_bytes() == f.read()
