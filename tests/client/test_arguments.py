"""Arguments checked at the door: each bad value refused with a message
naming the option, exit status 2, no traceback, nothing sent."""

import subprocess
import sys

import pytest

from .helpers import MiB, empty_image

URL = "https://localhost:1/images/x"


def diskferry(*args):
    return subprocess.run([sys.executable, "-m", "diskferry", *map(str, args)],
                          capture_output=True, text=True, timeout=60)


def refused(proc, *words):
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    for word in words:
        assert word in proc.stderr, proc.stderr
    return proc.stderr


@pytest.mark.parametrize("command", ["upload", "download"])
@pytest.mark.parametrize("option,value,words", [
    ("--request-size", "1", ["argument --request-size", "between 4.00 KiB "
                             "and 64.00 MiB"]),
    ("--request-size", "65M", ["argument --request-size", "out of range"]),
    ("--request-size", "8X", ["argument --request-size", "invalid size",
                              "K, M, G or T"]),
    ("--retries", "-1", ["argument --retries", "at least 0"]),
    ("--read-timeout", "0", ["argument --read-timeout", "more than 0"]),
    ("--connect-timeout", "-5", ["argument --connect-timeout",
                                 "more than 0"]),
    ("--read-timeout", "nan", ["argument --read-timeout"]),
    ("--workers", "0", ["argument --workers", "between 1 and 64"]),
    ("--workers", "65", ["argument --workers", "between 1 and 64"]),
    ("--workers", "two", ["argument --workers", "not an integer"]),
    ("--cafile", "/nonexistent/ca.pem", ["argument --cafile",
                                         "/nonexistent/ca.pem: no such file"]),
])
def test_bad_values_name_the_option(tmp_path, command, option, value, words):
    src = empty_image(tmp_path / "src.raw", MiB)
    args = (src, URL) if command == "upload" else (URL, tmp_path / "out.raw")
    refused(diskferry(command, option, value, *args), *words)


@pytest.mark.parametrize("text,size", [
    ("4K", 4096), ("4k", 4096), ("8M", 8 * MiB), ("8MiB", 8 * MiB),
    ("1G", 1024 * MiB), ("2T", 2 * 1024**4), ("4096", 4096)])
def test_sizes_take_binary_suffixes(text, size):
    from diskferry.cli import units

    assert units.parse_size(text) == size


def test_request_size_accepts_its_bounds(daemons, make_ticket, tmp_path):
    srv = daemons.get("diskferry")
    image = empty_image(tmp_path / "img.raw", MiB)
    t = make_ticket(srv, image, MiB, ops=["read"])
    for size in ("4K", "64M"):
        out = tmp_path / f"out-{size}.raw"
        proc = diskferry("download", "--quiet", "--cafile", srv.ca_file,
                         "--request-size", size, srv.image_url(t["uuid"]), out)
        assert proc.returncode == 0, proc.stderr


def test_missing_upload_source_is_named(tmp_path):
    missing = tmp_path / "nosuch.qcow2"
    refused(diskferry("upload", missing, URL), f"{missing}: no such file")


def test_missing_download_folder_is_named(tmp_path):
    out = tmp_path / "nosuch" / "out.raw"
    refused(diskferry("download", URL, out), f"{tmp_path / 'nosuch'}: no such "
                                             "folder")


def test_size_only_with_standard_input(tmp_path):
    src = empty_image(tmp_path / "src.raw", MiB)
    refused(diskferry("upload", "--size", "1M", src, URL),
            "--size is for standard input")


def test_http_url_against_a_tls_port_gets_a_hint(daemons, make_ticket,
                                                 tmp_path):
    srv = daemons.get("diskferry")
    image = empty_image(tmp_path / "img.raw", MiB)
    t = make_ticket(srv, image, MiB, ops=["read"])
    url = srv.image_url(t["uuid"])
    assert url.startswith("https://")
    plain = "http://" + url[len("https://"):]
    proc = diskferry("download", "--cafile", srv.ca_file, plain,
                     tmp_path / "out.raw")
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert f"speaks TLS: use {url}" in proc.stderr
