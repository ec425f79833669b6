"""``download --backing-file``: a relative name is relative to FILE's
folder, as ``--help`` says and as qemu-img names a backing file."""

import json
import subprocess
import sys

from nbd_servers import qemu_img

from .helpers import MiB, make_image

SIZE = 8 * MiB


def diskferry(*args, cwd):
    return subprocess.run([sys.executable, "-m", "diskferry", *map(str, args)],
                          capture_output=True, text=True, timeout=120, cwd=cwd)


def test_a_relative_backing_file_is_named_from_the_overlays_folder(
        daemons, make_ticket, tmp_path):
    srv = daemons.get("diskferry")
    make_image(tmp_path / "disk.raw", SIZE, "sparse")
    t = make_ticket(srv, tmp_path / "disk.raw", SIZE, ops=["read"])
    url = srv.image_url(t["uuid"])
    (tmp_path / "backups").mkdir()
    full = diskferry("download", "--quiet", "--cafile", srv.ca_file,
                     "--format", "qcow2", url, "backups/full.qcow2",
                     cwd=tmp_path)
    assert full.returncode == 0, full.stderr

    # From the current folder, backups/full.qcow2 is not "full.qcow2";
    # from the overlay's folder it is.
    inc = diskferry("download", "--quiet", "--cafile", srv.ca_file,
                    "--backing-file", "full.qcow2", url, "backups/inc.qcow2",
                    cwd=tmp_path)
    assert inc.returncode == 0, inc.stderr
    info = json.loads(qemu_img("info", "--output=json",
                               tmp_path / "backups/inc.qcow2"))
    assert info["backing-filename"] == "full.qcow2"
    qemu_img("compare", "-f", "raw", "-F", "qcow2", tmp_path / "disk.raw",
             tmp_path / "backups/inc.qcow2")


def test_a_backing_file_named_from_the_current_folder_is_refused(
        tmp_path):
    (tmp_path / "backups").mkdir()
    qemu_img("create", "-q", "-f", "qcow2", tmp_path / "backups/full.qcow2",
             SIZE)
    proc = diskferry("download", "--backing-file", "backups/full.qcow2",
                     "https://localhost:1/images/x", "backups/inc.qcow2",
                     cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr == (
        "diskferry download: error: --backing-file backups/full.qcow2: no "
        "such file (backups/backups/full.qcow2: a relative name is relative "
        "to FILE's folder)\n")
    assert not (tmp_path / "backups/inc.qcow2.part").exists()
