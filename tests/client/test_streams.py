"""Standard input and output as raw streams: ``download URL -`` and
``upload - URL``, over the UNIX socket and TLS, on both daemons."""

import json
import subprocess
import sys

import pytest

from .helpers import KINDS, MiB, allocated, empty_image, make_image

SIZE = 6 * MiB + 4096

ROUTES = [(kind, unix) for kind in KINDS for unix in ("auto", "never")]


def diskferry(*args, stdin=None, input=None, stdout=subprocess.PIPE):
    return subprocess.run([sys.executable, "-m", "diskferry", *map(str, args)],
                          stdin=stdin, input=input, stdout=stdout,
                          stderr=subprocess.PIPE, timeout=120)


@pytest.mark.parametrize("kind,unix", ROUTES)
def test_download_to_standard_output(daemons, make_ticket, tmp_path, kind,
                                     unix):
    srv = daemons.get(kind)
    content = make_image(tmp_path / "img.raw", SIZE, "sparse")
    t = make_ticket(srv, tmp_path / "img.raw", SIZE, ops=["read"])
    proc = diskferry("download", "--json", "--unix", unix, "--cafile",
                     srv.ca_file, "--request-size", "1M",
                     srv.image_url(t["uuid"]), "-")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == content            # zeros included, in order
    # The summary goes to standard error, out of the data's way.
    summary = json.loads(proc.stderr.decode().strip().splitlines()[-1])
    assert summary["connections"] == 1
    assert not (tmp_path / "-").exists()


@pytest.mark.parametrize("kind,unix", ROUTES)
def test_upload_from_standard_input(daemons, make_ticket, tmp_path, kind,
                                    unix):
    srv = daemons.get(kind)
    content = make_image(tmp_path / "src.raw", SIZE, "sparse")
    target = tmp_path / "target.raw"
    target.write_bytes(b"\xee" * SIZE)
    t = make_ticket(srv, target, SIZE)
    with open(tmp_path / "src.raw", "rb") as src:
        # A pipe, not a file: nothing can seek or map it.
        cat = subprocess.Popen(["cat"], stdin=src, stdout=subprocess.PIPE)
        proc = diskferry("upload", "--json", "--unix", unix, "--cafile",
                         srv.ca_file, "--request-size", "1M", "-",
                         srv.image_url(t["uuid"]), stdin=cat.stdout)
        cat.stdout.close()
        cat.wait()
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["image_bytes"] == SIZE
    assert target.read_bytes() == content


def test_upload_size_from_option(daemons, make_ticket, tmp_path):
    srv = daemons.get("diskferry")
    target = tmp_path / "target.raw"
    target.write_bytes(b"\xee" * (4 * MiB))
    t = make_ticket(srv, target, 4 * MiB)
    proc = diskferry("upload", "--quiet", "--cafile", srv.ca_file, "--size",
                     "1M", "-", srv.image_url(t["uuid"]),
                     input=b"\x11" * MiB)
    assert proc.returncode == 0, proc.stderr
    assert target.read_bytes() == b"\x11" * MiB + b"\xee" * (3 * MiB)


@pytest.mark.parametrize("data,message", [
    (b"\x11" * MiB, b"standard input ended after 1048576 bytes"),
    (b"\x11" * (3 * MiB), b"standard input holds more than 2097152 bytes"),
], ids=["short", "long"])
def test_upload_stream_of_the_wrong_length_fails(daemons, make_ticket,
                                                 tmp_path, data, message):
    srv = daemons.get("diskferry")
    target = empty_image(tmp_path / "target.raw", 2 * MiB)
    t = make_ticket(srv, target, 2 * MiB)
    proc = diskferry("upload", "--cafile", srv.ca_file, "-",
                     srv.image_url(t["uuid"]), input=data)
    assert proc.returncode == 1
    assert message in proc.stderr
    assert b"Traceback" not in proc.stderr


@pytest.mark.parametrize("args,message", [
    (["upload", "--format", "qcow2", "-", "URL"], b"raw stream"),
    (["upload", "--verify", "-", "URL"], b"--verify"),
    (["download", "--format", "qcow2", "URL", "-"], b"raw stream"),
    (["download", "--resume", "URL", "-"], b"--resume"),
])
def test_streams_are_raw_only(args, message):
    args = ["https://localhost:1/images/x" if a == "URL" else a for a in args]
    proc = diskferry(*args, input=b"")
    assert proc.returncode == 2
    assert message in proc.stderr


@pytest.mark.parametrize("tls", [True, False], ids=["tls", "tcp"])
def test_streams_survive_a_cut_connection(daemons, make_ticket, relay,
                                          tmp_path, tls):
    """A piece cut short is sent again from what the stream held: the
    upload keeps the piece until acknowledged, the download goes on
    from the last byte written."""
    srv = daemons.get("diskferry", tls=tls)
    content = make_image(tmp_path / "src.raw", SIZE, "full")
    target = empty_image(tmp_path / "target.raw", SIZE)
    t = make_ticket(srv, target, SIZE)
    scheme = "https" if tls else "http"
    ca = ["--cafile", srv.ca_file] if tls else []
    up_proxy = relay(srv, cut_after=3 * MiB + 1234)
    url = f"{scheme}://127.0.0.1:{up_proxy.port}/images/{t['uuid']}"
    proc = diskferry("upload", "--quiet", "--unix", "never", *ca,
                     "--request-size", "1M", "-", url, input=content)
    assert proc.returncode == 0, proc.stderr
    assert up_proxy.cuts == 1
    assert target.read_bytes() == content

    down_proxy = relay(srv, cut_after=2 * MiB + 777, direction="down")
    url = f"{scheme}://127.0.0.1:{down_proxy.port}/images/{t['uuid']}"
    proc = diskferry("download", "--quiet", "--unix", "never", *ca,
                     "--request-size", "1M", url, "-")
    assert proc.returncode == 0, proc.stderr
    assert down_proxy.cuts == 1
    assert proc.stdout == content


def test_upload_from_standard_input_keeps_a_sparse_target_sparse(
        daemons, make_ticket, tmp_path):
    """Zeros in a stream are not written where the target already reads
    zeros: a thin target stays thin, as with an upload from a file."""
    srv = daemons.get("diskferry")
    size = 32 * MiB
    content = make_image(tmp_path / "src.raw", size, "sparse")
    target = empty_image(tmp_path / "target.raw", size)
    t = make_ticket(srv, target, size)
    with open(tmp_path / "src.raw", "rb") as src:
        cat = subprocess.Popen(["cat"], stdin=src, stdout=subprocess.PIPE)
        proc = diskferry("upload", "--json", "--cafile", srv.ca_file,
                         "--request-size", "1M", "-",
                         srv.image_url(t["uuid"]), stdin=cat.stdout)
        cat.stdout.close()
        cat.wait()
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert target.read_bytes() == content
    data = summary["bytes"]
    assert summary["zero_bytes"] == 0
    assert summary["skipped_bytes"] == size - data
    # Only the pieces that hold data are allocated (1 MiB pieces).
    assert data <= 12 * MiB
    assert allocated(target) <= data


@pytest.mark.parametrize("unix", ["auto", "never"])
def test_download_to_a_reader_that_goes_away_ends_quietly(
        daemons, make_ticket, tmp_path, unix):
    """``download URL - | head -c N``: a closed standard output ends the
    command as Unix tools end (status 141, nothing on standard error),
    without retrying it as a network failure."""
    srv = daemons.get("diskferry")
    size = 32 * MiB
    make_image(tmp_path / "img.raw", size, "full")
    t = make_ticket(srv, tmp_path / "img.raw", size, ops=["read"])
    command = (f"{sys.executable} -m diskferry download --cafile "
               f"{srv.ca_file} --unix {unix} --request-size 1M "
               f"{srv.image_url(t['uuid'])} - | head -c 3000000 | wc -c; "
               f"echo ${{PIPESTATUS[0]}}")
    proc = subprocess.run(["bash", "-c", command], capture_output=True,
                          text=True, timeout=120)
    assert proc.stdout.split() == ["3000000", "141"], proc.stderr
    assert proc.stderr == ""
