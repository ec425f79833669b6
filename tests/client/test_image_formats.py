"""Images in any format qemu reads, through qemu-nbd, against both
daemons over the UNIX socket and TLS: uploads of qcow2 chains, vmdk, vdi,
vhdx, qed and OVA members; downloads into qcow2; single layers; zero
detection; interruptions that leave nothing behind.

Every comparison is made by qemu itself: the expected content is
``qemu-img convert -O raw`` of the source, or ``qemu-img compare``."""

import contextlib
import logging
import os
import signal
import subprocess
import sys
import tarfile
import time

import pytest

import nbd_servers
from diskferry import client
from nbd_servers import create_encrypted_qcow2, qemu_img, qemu_io
from servers import ticket_dict

from .helpers import KINDS, MiB

SIZE = 8 * MiB

#: (daemon, unix mode): the local path and TLS, on both daemons.
ROUTES = [(kind, unix) for kind in KINDS for unix in ("auto", "never")]
ROUTE_IDS = [f"{kind}-{'unix' if unix == 'auto' else 'tls'}"
             for kind, unix in ROUTES]


def write_guest(image, fmt):
    """Known writes: data, an allocated zero run (1 MiB, for zero
    detection), and holes between."""
    qemu_io(image, fmt, "write -P 0x61 0 1M", "write -P 0x62 3M 512k",
            "write -P 0 5M 1M", "write -P 0x63 7M 64k")


def raw_of(image, tmp_path, name="expected.raw"):
    """The guest-visible content of ``image``, by qemu."""
    out = tmp_path / name
    qemu_img("convert", "-U", "-O", "raw", image, out)
    return out.read_bytes()


def make_chain(tmp_path, reading="in-place"):
    """base <- mid.qcow2 <- top.qcow2: data in each layer, and a zero
    write in the top hiding the base's data.

    ``reading`` says how an upload reads it: "in-place" (qcow2 layers,
    their data sent from their files), "raw-base" (the same over a raw
    base) or "qemu-nbd" (a compressed cluster in the top: no plain place
    to send it from)."""
    base = tmp_path / ("base.raw" if reading == "raw-base" else "base.qcow2")
    base_fmt = "raw" if reading == "raw-base" else "qcow2"
    qemu_img("create", "-f", base_fmt, base, SIZE)
    qemu_io(base, base_fmt, "write -P 0x11 0 2M", "write -P 0x12 6M 2M")
    mid = tmp_path / "mid.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", base.name, "-F", base_fmt, mid)
    qemu_io(mid, "qcow2", "write -P 0x21 1M 1M")
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", top)
    compressed = "-c " if reading == "qemu-nbd" else ""
    qemu_io(top, "qcow2", f"write {compressed}-P 0x31 1536k 1M",
            "write -z 6M 1M")
    return top


@pytest.fixture
def chain(tmp_path):
    return make_chain(tmp_path)


#: How an upload reads an image that is not raw.
READINGS = ["in-place", "raw-base", "qemu-nbd"]


@contextlib.contextmanager
def reads(caplog, reading):
    """Check that an upload read its source as ``reading`` says."""
    with caplog.at_level(logging.DEBUG, logger="diskferry.client"):
        yield
    said = ("through qemu-nbd" if reading == "qemu-nbd"
            else "read in place")
    assert said in caplog.text


def converted(tmp_path, fmt):
    """A guest written in qcow2, converted by qemu-img to ``fmt``."""
    qcow2 = tmp_path / "guest.qcow2"
    qemu_img("create", "-f", "qcow2", qcow2, SIZE)
    write_guest(qcow2, "qcow2")
    if fmt == "qcow2":
        return qcow2
    path = tmp_path / f"guest.{fmt}"
    qemu_img("convert", "-O", fmt, qcow2, path)
    return path


def ova(tmp_path):
    vmdk = tmp_path / "disk1.vmdk"
    qcow2 = converted(tmp_path, "qcow2")
    qemu_img("convert", "-O", "vmdk", "-o", "subformat=streamOptimized",
             qcow2, vmdk)
    (tmp_path / "vm.ovf").write_text("<Envelope/>\n")
    path = tmp_path / "vm.ova"
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        tar.add(tmp_path / "vm.ovf", "vm.ovf")
        tar.add(vmdk, "disk1.vmdk")
    return path


def target_ticket(srv, make_ticket, tmp_path, fill=b"\xee", size=SIZE):
    """A raw target filled with ``fill``, so that any byte not written
    (a hole left unzeroed) shows."""
    path = tmp_path / "target.raw"
    path.write_bytes(fill * size)
    t = make_ticket(srv, path, size)
    return path, srv.image_url(t["uuid"])


@pytest.mark.parametrize("reading", READINGS)
@pytest.mark.parametrize("kind,unix", ROUTES, ids=ROUTE_IDS)
def test_two_level_chain_uploads_the_guest_disk(daemons, make_ticket,
                                                tmp_path, caplog, kind, unix,
                                                reading):
    srv = daemons.get(kind)
    target, url = target_ticket(srv, make_ticket, tmp_path)
    chain = make_chain(tmp_path, reading)
    with reads(caplog, reading):
        result = client.upload(chain, url, cafile=srv.ca_file, unix=unix)
    assert target.read_bytes() == raw_of(chain, tmp_path)
    assert result.transport == ("unix" if unix == "auto" else "tls")
    # Holes of the chain were zeroed, never sent as data.
    assert result.data_bytes < SIZE


FORMAT_ROUTES = ([(fmt, kind, unix) for fmt in ("vmdk", "vdi")
                  for kind, unix in ROUTES] +
                 [(fmt, "diskferry", "auto") for fmt in ("qcow2", "vhdx",
                                                         "qed")])


@pytest.mark.parametrize(
    "fmt,kind,unix", FORMAT_ROUTES,
    ids=[f"{f}-{k}-{'unix' if u == 'auto' else 'tls'}"
         for f, k, u in FORMAT_ROUTES])
def test_formats_round_trip(daemons, make_ticket, tmp_path, fmt, kind, unix):
    """Up as the guest's disk, back as raw and as qcow2: the same disk."""
    srv = daemons.get(kind)
    target, url = target_ticket(srv, make_ticket, tmp_path)
    source = converted(tmp_path, fmt)
    client.upload(source, url, cafile=srv.ca_file, unix=unix)
    assert target.read_bytes() == raw_of(source, tmp_path)
    for out_fmt in ("raw", "qcow2"):
        out = tmp_path / f"back.{out_fmt}"
        client.download(url, out, cafile=srv.ca_file, unix=unix,
                        format=out_fmt)
        subprocess.run(["qemu-img", "compare", "-F", out_fmt, source, out],
                       check=True, capture_output=True)


@pytest.mark.parametrize("kind,unix", ROUTES, ids=ROUTE_IDS)
def test_ova_member_uploads_in_place(daemons, make_ticket, tmp_path, kind,
                                     unix):
    srv = daemons.get(kind)
    target, url = target_ticket(srv, make_ticket, tmp_path)
    archive = ova(tmp_path)
    before = os.listdir(tmp_path)
    client.upload(archive, url, cafile=srv.ca_file, unix=unix,
                  member="disk1.vmdk")
    assert os.listdir(tmp_path) == before  # nothing extracted
    assert target.read_bytes() == raw_of(tmp_path / "disk1.vmdk", tmp_path)


@pytest.mark.parametrize("reading", ["in-place", "qemu-nbd"])
def test_zero_runs_inside_data_are_sent_as_zero(daemons, make_ticket,
                                                tmp_path, caplog, reading):
    srv = daemons.get("diskferry")
    # A raw guest converted without -S 0 would lose its zeros: make the
    # allocated zero MiB by hand in the qcow2.
    source = converted(tmp_path, "qcow2")
    if reading == "qemu-nbd":
        qemu_io(source, "qcow2", "write -c -P 0x64 4M 64k")
    expected = raw_of(source, tmp_path)
    target, url = target_ticket(srv, make_ticket, tmp_path)
    with reads(caplog, reading):
        found = client.upload(source, url, cafile=srv.ca_file)
    assert target.read_bytes() == expected
    target.write_bytes(b"\xee" * SIZE)
    plain = client.upload(source, url, cafile=srv.ca_file,
                          detect_zeros=False)
    assert target.read_bytes() == expected
    assert plain.data_bytes - found.data_bytes == MiB
    assert found.zero_bytes - plain.zero_bytes == MiB


@pytest.mark.parametrize("reading", ["in-place", "qemu-nbd"])
def test_single_layer_leaves_what_it_does_not_allocate(daemons, make_ticket,
                                                       tmp_path, caplog,
                                                       reading):
    srv = daemons.get("diskferry")
    chain = make_chain(tmp_path, reading)
    mid = tmp_path / "mid.qcow2"
    # The destination holds the layers below already.
    path = tmp_path / "target.raw"
    path.write_bytes(raw_of(mid, tmp_path, "mid.raw"))
    t = make_ticket(srv, path, SIZE)
    with reads(caplog, reading):
        result = client.upload(chain, srv.image_url(t["uuid"]),
                               cafile=srv.ca_file, single_layer=True)
    assert path.read_bytes() == raw_of(chain, tmp_path)
    # Only the top layer's own 1 MiB of data, and its zeroed MiB.
    assert result.data_bytes == MiB
    assert result.zero_bytes == MiB


@pytest.mark.parametrize("detect_zeros", [True, False],
                         ids=["detect-zeros", "spliced"])
@pytest.mark.parametrize("kind,unix", ROUTES, ids=ROUTE_IDS)
def test_download_into_qcow2(daemons, make_ticket, tmp_path, chain, kind,
                             unix, detect_zeros):
    srv = daemons.get(kind)
    expected = tmp_path / "expected.raw"
    expected.write_bytes(raw_of(chain, tmp_path))
    t = make_ticket(srv, expected, SIZE, ops=["read"])
    out = tmp_path / "copy.qcow2"
    client.download(srv.image_url(t["uuid"]), out, cafile=srv.ca_file,
                    unix=unix, format="qcow2", detect_zeros=detect_zeros)
    subprocess.run(["qemu-img", "check", out], check=True,
                   capture_output=True)
    info = qemu_img("info", "--output=json", out)
    assert '"format": "qcow2"' in info
    subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2",
                    expected, out], check=True, capture_output=True)
    assert not (tmp_path / "copy.qcow2.part").exists()
    # Sparse: the image holds about its data, not its size (the raw
    # file has no holes: only zero detection finds its zeros).
    if detect_zeros:
        assert os.stat(out).st_blocks * 512 < SIZE // 2


def test_download_over_backing_hides_backing_data(daemons, make_ticket,
                                                  tmp_path):
    srv = daemons.get("diskferry")
    backing = tmp_path / "old.raw"
    backing.write_bytes(os.urandom(SIZE))
    disk = tmp_path / "disk.raw"
    disk.write_bytes(b"\x5a" * MiB + bytes(SIZE - MiB))
    t = make_ticket(srv, disk, SIZE, ops=["read"])
    out = tmp_path / "new.qcow2"
    client.download(srv.image_url(t["uuid"]), out, cafile=srv.ca_file,
                    format="qcow2", backing_file=backing)
    info = qemu_img("info", "--output=json", out)
    assert '"backing-filename": "old.raw"' in info  # relative
    assert raw_of(out, tmp_path, "got.raw") == disk.read_bytes()


def test_upload_qcow2_to_an_nbd_ticket(daemons, tmp_path, chain):
    """The virt-v2v import: any image into a qcow2 volume that the daemon
    serves through qemu-nbd."""
    srv = daemons.get("diskferry")
    volume = tmp_path / "volume.qcow2"
    qemu_img("create", "-f", "qcow2", volume, SIZE)
    with nbd_servers.start_export("qemu-nbd", volume, fmt="qcow2") as export:
        t = ticket_dict("/unused", SIZE, ("read", "write"), url=export.url)
        srv.add_ticket(t)
        client.upload(chain, srv.image_url(t["uuid"]), cafile=srv.ca_file)
    subprocess.run(["qemu-img", "compare", chain, volume], check=True,
                   capture_output=True)


def test_missing_backing_file_fails_before_any_write(daemons, make_ticket,
                                                     tmp_path, chain):
    srv = daemons.get("diskferry")
    target, url = target_ticket(srv, make_ticket, tmp_path)
    os.unlink(tmp_path / "base.qcow2")
    with pytest.raises(client.UnsupportedFormat, match="base.qcow2"):
        client.upload(chain, url, cafile=srv.ca_file)
    assert target.read_bytes() == b"\xee" * SIZE


def test_encrypted_qcow2_is_refused(daemons, make_ticket, tmp_path):
    srv = daemons.get("diskferry")
    target, url = target_ticket(srv, make_ticket, tmp_path)
    image = tmp_path / "secret.qcow2"
    create_encrypted_qcow2(image, SIZE)
    with pytest.raises(client.UnsupportedFormat, match="encrypted"):
        client.upload(image, url, cafile=srv.ca_file)
    assert target.read_bytes() == b"\xee" * SIZE


# --- Interruptions ----------------------------------------------------------

def qemu_nbd_children(pid):
    """qemu-nbd processes whose parent is ``pid``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/comm") as f:
                comm = f.read().strip()
        except OSError:
            continue
        if comm == "qemu-nbd" and int(fields[1]) == pid:
            found.append(int(entry))
    return found


def gone(pids, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(os.path.exists(f"/proc/{p}") and
                   open(f"/proc/{p}/stat").read().split()[2] != "Z"
                   for p in pids):
            return True
        time.sleep(0.05)
    return False


def start_cli(*args):
    return subprocess.Popen([sys.executable, "-m", "diskferry", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for_qemu_nbd(proc):
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        children = qemu_nbd_children(proc.pid)
        if children:
            return children
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    raise AssertionError("no qemu-nbd started")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM,
                                 signal.SIGKILL])
def test_interrupted_upload_leaves_no_qemu_nbd(slow_ticket, tmp_path, sig):
    srv, url = slow_ticket
    chain = make_chain(tmp_path, "qemu-nbd")
    proc = start_cli("upload", "--cafile", srv.ca_file, "--request-size",
                     "64K", "--workers", "1", "--no-detect-zeros", chain, url)
    children = wait_for_qemu_nbd(proc)
    time.sleep(0.3)
    proc.send_signal(sig)
    proc.communicate(timeout=30)
    assert proc.returncode != 0
    assert gone(children), "qemu-nbd outlived the upload"


@pytest.mark.parametrize("writer", ["qemu-nbd", "own"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_interrupted_download_leaves_no_image(slow_ticket, tmp_path, sig,
                                              writer):
    """Through qemu-nbd (an overlay) or written by the client (a new
    qcow2): an interrupted download is never taken for an image."""
    srv, url = slow_ticket
    out = tmp_path / "backup.qcow2"
    part = tmp_path / "backup.qcow2.part"
    args = ["--backing-file", make_chain(tmp_path)] if writer == "qemu-nbd" \
        else []
    proc = start_cli("download", "--cafile", srv.ca_file, "--request-size",
                     "64K", "--workers", "1", "--format", "qcow2", *args, url,
                     out)
    children = wait_for_qemu_nbd(proc) if writer == "qemu-nbd" else []
    deadline = time.monotonic() + 20
    while not part.exists() and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    time.sleep(0.3)
    proc.send_signal(sig)
    proc.communicate(timeout=30)
    assert proc.returncode != 0
    assert gone(children), "qemu-nbd outlived the download"
    assert not out.exists()
    if sig == signal.SIGINT:
        assert not part.exists()
