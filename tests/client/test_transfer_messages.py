"""What upload and download say when something is wrong, and what their
summaries claim: the cause and the fix once, no offset where nothing
happened, and no more bytes than moved."""

import subprocess
import sys

import pytest

from .helpers import MiB, empty_image, make_image


def diskferry(*args, input=None):
    return subprocess.run([sys.executable, "-m", "diskferry", *map(str, args)],
                          input=input, capture_output=True, timeout=120)


@pytest.fixture
def target(daemons, make_ticket, tmp_path):
    """A 4 MiB raw target behind a read-write ticket: (server, URL)."""
    srv = daemons.get("diskferry")
    t = make_ticket(srv, empty_image(tmp_path / "target.raw", 4 * MiB),
                    4 * MiB)
    return srv, srv.image_url(t["uuid"])


def _error(proc):
    assert proc.returncode == 1, proc
    lines = proc.stderr.decode().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("diskferry upload: error: ")
    return lines[0]


def test_a_source_larger_than_the_image_says_what_to_do(target, tmp_path):
    srv, url = target
    make_image(tmp_path / "src.raw", 8 * MiB, "sparse")
    error = _error(diskferry("upload", "--cafile", srv.ca_file,
                             tmp_path / "src.raw", url))
    assert error.endswith(
        f"{tmp_path / 'src.raw'} (8388608 bytes) is larger than the image "
        f"(4194304 bytes): upload it to a ticket of at least 8388608 bytes")


def test_a_short_standard_input_is_told_once(target):
    srv, url = target
    error = _error(diskferry("upload", "--cafile", srv.ca_file, "-", url,
                             input=b"\x11" * 1000))
    assert error == (
        "diskferry upload: error: standard input ended after 1000 bytes; "
        "expected 4194304 (pass --size for a shorter stream)")


def test_a_server_refusal_names_the_request_and_the_offset(target):
    srv, url = target
    error = _error(diskferry("upload", "--cafile", srv.ca_file, "-",
                             url + "-gone", input=b"\x11" * MiB))
    assert "failed:" not in error
    assert error.count("(at offset") <= 1
    assert "403" in error


@pytest.mark.parametrize("source,summary", [
    ("--size 1000", "uploaded 1000 B of 4.00 MiB (1000 B data) in "),
    ("file", "uploaded 1.00 MiB of 4.00 MiB (1.00 MiB data) in "),
], ids=["stream", "file"])
def test_a_summary_counts_what_the_source_held(target, tmp_path, source,
                                               summary):
    """A source shorter than the image leaves the rest as it was: the
    summary says how much of the image the upload covered."""
    srv, url = target
    if source == "file":
        make_image(tmp_path / "src.raw", MiB, "full")
        args, data = [tmp_path / "src.raw"], None
    else:
        args, data = ["--size", "1000", "-"], b"\x11" * 1000
    proc = diskferry("upload", "--cafile", srv.ca_file, *args, url,
                     input=data)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.decode().startswith(summary), proc.stdout


def test_progress_adds_up_to_what_the_upload_covers(target, tmp_path):
    """A progress bar over a source shorter than the image ends full."""
    from diskferry import client

    srv, url = target
    make_image(tmp_path / "src.raw", MiB, "full")
    started, done = [], []
    result = client.upload(tmp_path / "src.raw", url, cafile=srv.ca_file,
                           on_start=started.append, progress=done.append)
    assert started == [MiB]
    assert sum(done) == MiB == result.copied_bytes
    assert result.image_size == 4 * MiB
