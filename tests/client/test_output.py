"""What upload and download print: chosen by option, never by where
standard output goes; times that include --verify; binary units."""

import io
import json
import re
import subprocess
import sys

import pytest

from diskferry.cli import units
from diskferry.cli.progress import ProgressBar

from .helpers import MiB, empty_image, make_image

SIZE = 8 * MiB


def diskferry(*args):
    return subprocess.run([sys.executable, "-m", "diskferry", *map(str, args)],
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def image_url(daemons, make_ticket, tmp_path):
    srv = daemons.get("diskferry")
    make_image(tmp_path / "img.raw", SIZE, "sparse")
    t = make_ticket(srv, tmp_path / "img.raw", SIZE)
    return srv, srv.image_url(t["uuid"])


@pytest.mark.parametrize("command", ["upload", "download"])
def test_quiet_prints_nothing_when_not_a_terminal(image_url, tmp_path,
                                                  command):
    srv, url = image_url
    if command == "upload":
        make_image(tmp_path / "src.raw", SIZE, "sparse")
        args = (tmp_path / "src.raw", url)
    else:
        args = (url, tmp_path / "out.raw")
    proc = diskferry(command, "--quiet", "--cafile", srv.ca_file, *args)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr == ""


def test_default_is_the_human_line_when_not_a_terminal(image_url, tmp_path):
    srv, url = image_url
    proc = diskferry("download", "--cafile", srv.ca_file, url,
                     tmp_path / "out.raw")
    assert proc.returncode == 0, proc.stderr
    assert re.fullmatch(r"downloaded 8.00 MiB \(.* data\) in [\d.]+ s, "
                        r"[\d.]+ [KMGT]?i?B/s via unix \(4 connections\)\n",
                        proc.stdout)


def test_json_is_one_line_with_the_verification_in_its_time(image_url,
                                                            tmp_path):
    srv, url = image_url
    proc = diskferry("download", "--json", "--verify", "--cafile",
                     srv.ca_file, url, tmp_path / "out.raw")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("\n") == 1
    summary = json.loads(proc.stdout)
    assert summary["verified"] is True
    assert summary["verify_seconds"] > 0
    assert summary["seconds"] == pytest.approx(
        summary["copy_seconds"] + summary["verify_seconds"], abs=1e-5)


def test_human_line_names_the_verification_time(image_url, tmp_path):
    srv, url = image_url
    proc = diskferry("download", "--verify", "--cafile", srv.ca_file, url,
                     tmp_path / "out.raw")
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"in [\d.]+ s \(copy [\d.]+ s at [\d.]+ [KMG]iB/s, "
                     r"verify [\d.]+ s\) via unix .*checksum verified",
                     proc.stdout), proc.stdout


def test_quiet_and_json_exclude_each_other(tmp_path):
    proc = diskferry("download", "--quiet", "--json",
                     "https://localhost:1/images/x", tmp_path / "x")
    assert proc.returncode == 2
    assert "not allowed with argument" in proc.stderr


def test_progress_bar_uses_the_summary_units():
    out = io.StringIO()
    bar = ProgressBar("download", out)
    bar.start(4 * units.GiB)
    bar.update(3 * units.GiB)
    line = bar.line(bar._started + 2.0)
    assert "3.00 GiB/4.00 GiB" in line
    assert "1.50 GiB/s" in line
    assert " 75% " in line
    bar.close()
    assert out.getvalue().endswith("\n")


@pytest.mark.parametrize("n,text", [
    (0, "0 B"), (1023, "1023 B"), (1024, "1.00 KiB"), (1536 * MiB, "1.50 GiB"),
    (3 * units.TiB, "3.00 TiB")])
def test_human_sizes(n, text):
    assert units.human(n) == text


def test_upload_quiet_errors_still_print(daemons, tmp_path):
    srv = daemons.get("diskferry")
    src = empty_image(tmp_path / "src.raw", MiB)
    proc = diskferry("upload", "--quiet", "--cafile", srv.ca_file, src,
                     srv.image_url("no-such-ticket"))
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr.startswith("diskferry upload: error: ")
