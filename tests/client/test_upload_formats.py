"""An upload refuses a source it would corrupt or cannot read, before
anything is sent, and ``--format raw`` uploads a container's bytes as
asked: the command and the library, against both daemons, with and
without qemu-img. (What is read through qemu-nbd: test_image_formats.)"""

import os
import subprocess
import sys

import pytest

from diskferry import client
from diskferry.daemon.handlers.app import TICKET_PATHS

from .helpers import KINDS, MiB, format_image, log_offset, make_image

#: Target size: larger than every test image's file (luks is ~3 MiB).
SIZE = 4 * MiB

#: Sources no copy can read as they are, and what the message names.
REFUSED = {"luks": "luks image", "ova": "tar archive"}

#: What the message names when qemu-img is missing.
NAMED = {"ova": "tar archive"}


def diskferry(*args, path=None):
    env = dict(os.environ)
    if path is not None:
        env["PATH"] = str(path)
    return subprocess.run([sys.executable, "-m", "diskferry", *map(str, args)],
                          capture_output=True, text=True, timeout=120, env=env)


@pytest.fixture
def target(daemons, make_ticket, tmp_path):
    """(server, url, target path, its bytes): a diskferry ticket on a
    target full of random bytes, so that any write would show."""
    srv = daemons.get("diskferry")
    path = tmp_path / "target.raw"
    content = make_image(path, SIZE, "full")
    ticket = make_ticket(srv, path, SIZE)
    return srv, srv.image_url(ticket["uuid"]), path, content


def assert_refused(proc, srv, mark, url, path, content, named):
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("diskferry upload: error: ")
    assert named in lines[0]
    assert "Traceback" not in proc.stderr
    assert path.read_bytes() == content
    # Not one request: the ticket never shows in the server's log (where
    # its id is shortened, a bearer secret).
    assert TICKET_PATHS.redact_path(f"/images/{url.rsplit('/', 1)[1]}") not in \
        srv.log_text()[mark:]


@pytest.mark.parametrize("kind", REFUSED)
def test_upload_refuses_what_it_cannot_read(target, tmp_path, kind):
    srv, url, path, content = target
    image = format_image(tmp_path, kind)
    mark = log_offset(srv)
    proc = diskferry("upload", "--cafile", srv.ca_file, image, url)
    assert_refused(proc, srv, mark, url, path, content,
                   f"{image} is a {REFUSED[kind]}")
    assert "--format raw" in proc.stderr
    if kind == "ova":
        assert "--member NAME" in proc.stderr
        assert "vm.ovf, disk1.vmdk" in proc.stderr
    else:
        assert "qemu-img convert --object secret" in proc.stderr


@pytest.mark.parametrize("kind", ["qcow2", "vmdk", "luks", "ova", "vdi"])
def test_upload_refuses_by_magic_without_qemu_img(target, tmp_path, kind):
    srv, url, path, content = target
    image = format_image(tmp_path, kind)
    empty = tmp_path / "bin"
    empty.mkdir()
    mark = log_offset(srv)
    proc = diskferry("upload", "--cafile", srv.ca_file, image, url,
                     path=empty)
    named = NAMED.get(kind, f"{kind} image")
    assert_refused(proc, srv, mark, url, path, content,
                   f"{image} is a {named}")
    if kind in ("qcow2", "vmdk", "vdi"):
        assert "needs qemu-img and qemu-nbd" in proc.stderr


def test_raw_uploads_without_qemu_img(target, tmp_path):
    srv, url, path, _ = target
    content = make_image(tmp_path / "disk.raw", SIZE, "sparse")
    empty = tmp_path / "bin"
    empty.mkdir()
    proc = diskferry("upload", "--cafile", srv.ca_file, tmp_path / "disk.raw",
                     url, path=empty)
    assert proc.returncode == 0, proc.stderr
    assert path.read_bytes() == content


def test_raw_starting_with_qcow2_magic_is_refused(target, tmp_path):
    srv, url, path, content = target
    odd = tmp_path / "odd.raw"
    odd.write_bytes(b"QFI\xfb" + os.urandom(MiB - 4))
    mark = log_offset(srv)
    proc = diskferry("upload", "--cafile", srv.ca_file, odd, url)
    assert_refused(proc, srv, mark, url, path, content, "qemu-img cannot open it")
    # The user knows better: the bytes are the disk.
    proc = diskferry("upload", "--cafile", srv.ca_file, "--format", "raw",
                     odd, url)
    assert proc.returncode == 0, proc.stderr
    assert path.read_bytes()[:MiB] == odd.read_bytes()


def test_unknown_format_is_refused(target, tmp_path):
    srv, url, path, content = target
    image = format_image(tmp_path, "qcow2")
    mark = log_offset(srv)
    proc = diskferry("upload", "--cafile", srv.ca_file, "--format",
                     "nonsense", image, url)
    assert_refused(proc, srv, mark, url, path, content,
                   "'nonsense' is not one diskferry reads")


def test_wrong_format_named_is_refused(target, tmp_path):
    srv, url, path, content = target
    image = format_image(tmp_path, "qcow2")
    mark = log_offset(srv)
    proc = diskferry("upload", "--cafile", srv.ca_file, "--format", "vmdk",
                     image, url)
    assert_refused(proc, srv, mark, url, path, content,
                   "qemu cannot read it as vmdk")


@pytest.mark.parametrize("kind", KINDS)
def test_format_raw_uploads_a_qcow2_container_byte_for_byte(
        daemons, make_ticket, tmp_path, kind):
    srv = daemons.get(kind)
    target = tmp_path / "target.raw"
    before = make_image(target, SIZE, "full")
    ticket = make_ticket(srv, target, SIZE)
    image = format_image(tmp_path, "qcow2")
    container = image.read_bytes()
    proc = diskferry("upload", "--cafile", srv.ca_file, "--format", "raw",
                     image, srv.image_url(ticket["uuid"]))
    assert proc.returncode == 0, proc.stderr
    # The container, holes included; past the source's end, what was there.
    assert target.read_bytes() == container + before[len(container):]


@pytest.mark.parametrize("kind", KINDS)
def test_library_refuses_before_any_request(daemons, make_ticket, tmp_path,
                                            kind):
    srv = daemons.get(kind)
    target = tmp_path / "target.raw"
    content = make_image(target, SIZE, "full")
    ticket = make_ticket(srv, target, SIZE)
    url = srv.image_url(ticket["uuid"])
    image = format_image(tmp_path, "luks")
    with pytest.raises(client.UnsupportedFormat) as e:
        client.upload(image, url, cafile=srv.ca_file)
    assert e.value.format == "luks"
    assert e.value.path == str(image)
    assert 'format="raw"' in str(e.value)
    assert target.read_bytes() == content

    client.upload(image, url, cafile=srv.ca_file, format="raw")
    assert target.read_bytes()[:image.stat().st_size] == image.read_bytes()


def test_library_refuses_even_an_unreachable_url(tmp_path):
    # Refused before connecting: the port is closed, and that is not what
    # the error says.
    image = format_image(tmp_path, "luks")
    with pytest.raises(client.UnsupportedFormat):
        client.upload(image, "https://localhost:1/images/x")


def test_help_says_what_upload_accepts():
    out = diskferry("upload", "--help").stdout
    assert "--format" in out
    assert "--member" in out
    assert "qemu-nbd" in out


@pytest.mark.root
def test_block_device_holding_a_qcow2_uploads_its_disk(target, tmp_path,
                                                       loop_device):
    srv, url, path, content = target
    image = format_image(tmp_path, "qcow2")
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x77 0 64k",
                    str(image)], check=True, capture_output=True)
    dev = loop_device(SIZE, image.read_bytes())
    proc = diskferry("upload", "--cafile", srv.ca_file, dev, url)
    assert proc.returncode == 0, proc.stderr
    assert path.read_bytes()[:MiB] == b"\x77" * 65536 + bytes(MiB - 65536)
    # Without qemu-img it cannot be read, and nothing is written.
    path.write_bytes(content)
    empty = tmp_path / "bin"
    empty.mkdir()
    mark = log_offset(srv)
    proc = diskferry("upload", "--cafile", srv.ca_file, dev, url, path=empty)
    assert_refused(proc, srv, mark, url, path, content,
                   f"{dev} is a qcow2 image")


@pytest.mark.root
def test_block_device_holding_a_raw_disk_uploads(target, loop_device):
    srv, url, path, _ = target
    dev = loop_device(SIZE)
    proc = diskferry("upload", "--cafile", srv.ca_file, dev, url)
    assert proc.returncode == 0, proc.stderr
    with open(dev, "rb") as f:
        assert path.read_bytes() == f.read()
