"""The upload and download commands, run as a user runs them."""

import json
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from .helpers import KINDS, MiB, data_transports, empty_image, log_offset, make_image

SIZE = 8 * MiB


def diskferry(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "diskferry", *map(str, args)],
                          capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}: {proc.stderr}")
    return proc


@pytest.mark.parametrize("command", ["upload", "download"])
def test_help_shows_an_example(command):
    out = diskferry(command, "--help").stdout
    assert "example" in out
    assert f"diskferry {command} --cafile" in out
    for option in ("--cafile", "--insecure", "--workers", "--request-size",
                   "--unix", "--verify", "--quiet"):
        assert option in out


@pytest.mark.parametrize("unix", ["auto", "never"])
@pytest.mark.parametrize("kind", KINDS)
def test_upload_and_download_print_json_with_json(
        daemons, make_ticket, tmp_path, kind, unix):
    srv = daemons.get(kind)
    content = make_image(tmp_path / "src.raw", SIZE, "sparse")
    target = empty_image(tmp_path / "target.raw", SIZE)
    ticket = make_ticket(srv, target, SIZE)
    url = srv.image_url(ticket["uuid"])
    expected = "unix" if unix == "auto" else "tls"

    mark = log_offset(srv)
    up = diskferry("upload", "--json", "--cafile", srv.ca_file, "--unix", unix,
                   "--verify", "--request-size", "2M", tmp_path / "src.raw", url)
    summary = json.loads(up.stdout)
    assert summary["transport"] == expected
    assert summary["seconds"] > 0
    assert 0 < summary["bytes"] < SIZE
    assert summary["verified"] is True
    assert up.stderr == ""  # no progress bar when not on a terminal
    assert target.read_bytes() == content
    side = "local" if unix == "auto" else "remote"
    assert data_transports(srv, mark, ticket["uuid"]) == {side}

    down = diskferry("download", "--json", "--cafile", srv.ca_file,
                     "--unix", unix, "--verify", "--workers", "2", url,
                     tmp_path / "dst.raw")
    summary = json.loads(down.stdout)
    assert summary["transport"] == expected
    assert summary["image_bytes"] == SIZE
    assert (tmp_path / "dst.raw").read_bytes() == content


def test_errors_are_one_line_and_exit_1(daemons, tmp_path):
    srv = daemons.get("diskferry")
    proc = diskferry("download", "--cafile", srv.ca_file,
                     srv.image_url("no-such-ticket"), tmp_path / "x",
                     check=False)
    assert proc.returncode == 1
    assert proc.stderr.startswith("diskferry download: error: ")
    assert "403" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_untrusted_certificate_is_refused_unless_insecure(daemons, make_ticket,
                                                          tmp_path):
    srv = daemons.get("diskferry")
    make_image(tmp_path / "img.raw", MiB, "full")
    ticket = make_ticket(srv, tmp_path / "img.raw", MiB, ops=["read"])
    url = srv.image_url(ticket["uuid"])
    refused = diskferry("download", "--unix", "never", url, tmp_path / "a",
                        check=False)
    assert refused.returncode == 1
    assert "CERTIFICATE_VERIFY_FAILED" in refused.stderr
    diskferry("download", "--insecure", "--unix", "never", url, tmp_path / "b")
    assert (tmp_path / "b").read_bytes() == (tmp_path / "img.raw").read_bytes()


def test_verify_detects_a_difference(daemons, make_ticket, tmp_path):
    srv = daemons.get("diskferry")
    make_image(tmp_path / "src.raw", MiB, "full")
    target = tmp_path / "target.raw"
    target.write_bytes(b"\1" * (2 * MiB))  # bigger image: tail differs
    ticket = make_ticket(srv, target, 2 * MiB)
    proc = diskferry("upload", "--cafile", srv.ca_file, "--verify",
                     tmp_path / "src.raw", srv.image_url(ticket["uuid"]),
                     check=False)
    assert proc.returncode == 1
    assert "checksums differ" in proc.stderr


@pytest.mark.skipif(shutil.which("script") is None, reason="needs script(1)")
def test_terminal_gets_a_progress_bar_and_a_summary(daemons, make_ticket,
                                                    tmp_path):
    srv = daemons.get("diskferry")
    make_image(tmp_path / "img.raw", SIZE, "sparse")
    ticket = make_ticket(srv, tmp_path / "img.raw", SIZE, ops=["read"])
    command = " ".join(shlex.quote(str(a)) for a in (
        sys.executable, "-m", "diskferry", "download", "--cafile",
        srv.ca_file, srv.image_url(ticket["uuid"]), tmp_path / "out.raw"))
    # script(1) runs the command on a pseudo-terminal of a known width.
    proc = subprocess.run(["script", "-qec", f"stty cols 120 rows 40; {command}",
                           "/dev/null"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout
    screen = proc.stdout.replace("\r", "\n")
    assert re.search(r"download 100% \|#+\| 8.00 MiB/8.00 MiB [\d.]+ "
                     r"[KMG]iB/s", screen)
    assert re.search(r"downloaded 8.00 MiB \(.* data\) in [\d.]+ s, "
                     r"[\d.]+ [KMG]iB/s via unix", screen)


@pytest.mark.parametrize("args,message", [
    (["--incremental"], "--incremental needs --backing-file (the previous "
     "backup the new overlay reads through)"),
    (["--format", "raw", "--backing-file", "{base}"],
     "--backing-file needs --format qcow2: a raw image has none"),
    (["--backing-file", "{tmp}/nosuch.qcow2"],
     "--backing-file {tmp}/nosuch.qcow2: no such file"),
])
def test_download_arguments_checked_at_the_door(tmp_path, args, message):
    base = tmp_path / "base.qcow2"
    base.write_bytes(b"")
    args = [a.format(base=base, tmp=tmp_path) for a in args]
    # The URL is never reached: the arguments are refused first.
    proc = diskferry("download", *args, "https://localhost:1/images/x",
                     tmp_path / "out.qcow2", check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == (f"diskferry download: error: "
                           f"{message.format(tmp=tmp_path)}\n")
    assert not (tmp_path / "out.qcow2").exists()


def test_download_never_replaces_a_file_unasked(daemons, make_ticket,
                                                tmp_path):
    srv = daemons.get("diskferry")
    content = make_image(tmp_path / "img.raw", SIZE, "sparse")
    t = make_ticket(srv, tmp_path / "img.raw", SIZE, ops=["read"])
    url = srv.image_url(t["uuid"])
    out = tmp_path / "out.raw"
    out.write_bytes(b"precious")
    proc = diskferry("download", "--cafile", srv.ca_file, url, out,
                     check=False)
    assert proc.returncode == 2
    assert "exists; pass --overwrite" in proc.stderr
    assert out.read_bytes() == b"precious"
    diskferry("download", "--cafile", srv.ca_file, "--overwrite", url, out)
    assert out.read_bytes() == content
    assert not (tmp_path / "out.raw.part").exists()


def test_verify_reads_images_through_qemu_nbd(daemons, make_ticket, tmp_path):
    srv = daemons.get("diskferry")
    source = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", source,
                    str(SIZE)], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x44 1M 2M",
                    source], check=True, capture_output=True)
    target = tmp_path / "target.raw"
    target.write_bytes(b"\xee" * SIZE)
    t = make_ticket(srv, target, SIZE)
    url = srv.image_url(t["uuid"])
    up = diskferry("upload", "--json", "--cafile", srv.ca_file, "--verify",
                   source, url)
    assert json.loads(up.stdout)["verified"] is True
    down = diskferry("download", "--json", "--cafile", srv.ca_file,
                     "--verify", "--format", "qcow2", url, tmp_path / "back.qcow2")
    assert json.loads(down.stdout)["verified"] is True
    refused = diskferry("upload", "--cafile", srv.ca_file, "--verify",
                        "--single-layer", source, url, check=False)
    assert refused.returncode == 2
    assert "a single layer is not one" in refused.stderr
