"""Whole-image upload and download against real daemons."""

import os
import shutil
import subprocess
import time

import pytest

from diskferry import client

from .helpers import (
    KINDS,
    MiB,
    allocated,
    data_transports,
    empty_image,
    log_offset,
    make_image,
    sparse_runs,
)

SIZE = 16 * MiB

TRANSPORTS = {"never": ("tls", "remote"), "auto": ("unix", "local")}


@pytest.mark.parametrize("layout", ["full", "sparse"])
@pytest.mark.parametrize("unix", ["auto", "never"], ids=["unix", "tls"])
@pytest.mark.parametrize("kind", KINDS)
def test_upload_then_download(daemons, make_ticket, tmp_path, kind, unix,
                              layout):
    srv = daemons.get(kind)
    content = make_image(tmp_path / "src.raw", SIZE, layout)
    target = empty_image(tmp_path / "target.raw", SIZE)
    ticket = make_ticket(srv, target, SIZE, sparse=True)
    url = srv.image_url(ticket["uuid"])
    transport, served_by = TRANSPORTS[unix]
    done = []

    mark = log_offset(srv)
    up = client.upload(tmp_path / "src.raw", url, cafile=srv.ca_file,
                       unix=unix, request_size=MiB, progress=done.append)
    assert up.transport == transport
    assert target.read_bytes() == content
    assert sum(done) == SIZE
    assert data_transports(srv, mark, ticket["uuid"]) == {served_by}

    mark = log_offset(srv)
    dst = tmp_path / "dst.raw"
    down = client.download(url, dst, cafile=srv.ca_file, unix=unix,
                           request_size=MiB, workers=3)
    assert down.transport == transport
    assert down.image_size == SIZE
    assert dst.read_bytes() == content
    assert data_transports(srv, mark, ticket["uuid"]) == {served_by}
    if layout == "sparse":
        data = sum(length for _, length in sparse_runs(SIZE))
        assert up.data_bytes < SIZE
        if kind == "diskferry":
            # The server reports the holes, so they are neither sent
            # nor written: the copy keeps them.
            assert down.data_bytes < SIZE
            assert allocated(dst) <= data + 3 * MiB


@pytest.mark.parametrize("kind", KINDS)
def test_upload_zeroes_old_content_under_holes(daemons, make_ticket, tmp_path,
                                               kind):
    srv = daemons.get(kind)
    content = make_image(tmp_path / "src.raw", SIZE, "sparse")
    target = tmp_path / "target.raw"
    target.write_bytes(b"\xff" * SIZE)
    ticket = make_ticket(srv, target, SIZE)
    result = client.upload(tmp_path / "src.raw", srv.image_url(ticket["uuid"]),
                           cafile=srv.ca_file, request_size=2 * MiB)
    assert result.zero_bytes > 0
    assert target.read_bytes() == content


@pytest.mark.parametrize("kind", KINDS)
def test_download_replaces_existing_file(daemons, make_ticket, tmp_path, kind):
    srv = daemons.get(kind)
    content = make_image(tmp_path / "img.raw", SIZE, "sparse")
    ticket = make_ticket(srv, tmp_path / "img.raw", SIZE, ops=["read"])
    dst = tmp_path / "dst.raw"
    dst.write_bytes(b"\xff" * (SIZE + 4096))
    client.download(srv.image_url(ticket["uuid"]), dst, cafile=srv.ca_file)
    assert dst.read_bytes() == content


@pytest.mark.parametrize("kind", KINDS)
def test_upload_larger_than_image_fails_early(daemons, make_ticket, tmp_path,
                                              kind):
    srv = daemons.get(kind)
    make_image(tmp_path / "src.raw", 2 * MiB, "full")
    target = empty_image(tmp_path / "target.raw", MiB)
    ticket = make_ticket(srv, target, MiB)
    with pytest.raises(client.TransferError, match="larger than the image"):
        client.upload(tmp_path / "src.raw", srv.image_url(ticket["uuid"]),
                      cafile=srv.ca_file)
    assert allocated(target) == 0


@pytest.mark.parametrize("kind", KINDS)
def test_upload_to_read_only_ticket_is_refused(daemons, make_ticket, tmp_path,
                                               kind):
    srv = daemons.get(kind)
    make_image(tmp_path / "src.raw", MiB, "full")
    target = empty_image(tmp_path / "target.raw", MiB)
    ticket = make_ticket(srv, target, MiB, ops=["read"])
    with pytest.raises(client.UnsupportedOperation, match="writing"):
        client.upload(tmp_path / "src.raw", srv.image_url(ticket["uuid"]),
                      cafile=srv.ca_file)


@pytest.mark.parametrize("kind", KINDS)
def test_unknown_ticket_is_a_clear_error(daemons, kind, tmp_path):
    srv = daemons.get(kind)
    with pytest.raises(client.HTTPError) as e:
        client.download(srv.image_url("no-such-ticket"), tmp_path / "x",
                        cafile=srv.ca_file)
    assert e.value.status == 403
    assert not os.path.exists(tmp_path / "x")


@pytest.fixture
def qemu_nbd(tmp_path):
    """qemu_nbd(image) -> socket path of a qemu-nbd serving a raw image."""
    if shutil.which("qemu-nbd") is None:
        pytest.skip("needs qemu-nbd")
    procs = []

    def start(image):
        sock = tmp_path / f"nbd-{len(procs)}.sock"
        procs.append(subprocess.Popen(
            ["qemu-nbd", "--format=raw", "--persistent", "--shared=8",
             f"--socket={sock}", str(image)], stderr=subprocess.PIPE))
        deadline = time.monotonic() + 10
        while not sock.exists():
            assert time.monotonic() < deadline, "qemu-nbd did not start"
            time.sleep(0.05)
        return sock

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait()


@pytest.mark.parametrize("unix", ["auto", "never"], ids=["unix", "tls"])
def test_download_keeps_holes_from_ovirt_imageio_nbd(daemons, make_ticket,
                                                     qemu_nbd, tmp_path, unix):
    # ovirt-imageio reports holes only through NBD (its file backend says
    # "all data"), as oVirt serves images.
    srv = daemons.get("ovirt-imageio")
    content = make_image(tmp_path / "img.raw", SIZE, "sparse")
    sock = qemu_nbd(tmp_path / "img.raw")
    ticket = make_ticket(srv, tmp_path / "img.raw", SIZE, ops=["read"],
                         url=f"nbd:unix:{sock}")
    dst = tmp_path / "dst.raw"
    result = client.download(srv.image_url(ticket["uuid"]), dst,
                             cafile=srv.ca_file, unix=unix)
    assert dst.read_bytes() == content
    data = sum(length for _, length in sparse_runs(SIZE))
    assert result.data_bytes < SIZE
    assert allocated(dst) <= data + 3 * MiB


def test_download_to_a_device_keeps_no_journal(daemons, make_ticket,
                                               tmp_path):
    """A device (here /dev/null) is written in place: no .part, so no
    journal to record into, keep or remove."""
    srv = daemons.get("diskferry")
    make_image(tmp_path / "img.raw", SIZE, "sparse")
    ticket = make_ticket(srv, tmp_path / "img.raw", SIZE, ops=["read"])
    result = client.download(srv.image_url(ticket["uuid"]), "/dev/null",
                             cafile=srv.ca_file)
    assert result.image_size == SIZE
    assert result.data_bytes + result.skipped_bytes == SIZE
    assert not os.path.exists("/dev/null.part")
    assert not os.path.exists("/dev/null.part.done")
