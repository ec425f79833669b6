"""Interrupted raw downloads: never presented as complete, and resumed
from what was written and synced (the journal beside FILE.part)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from diskferry.client import resume

from .conftest import SLOW_SIZE
from .helpers import MiB


def start_download(srv, url, out, *extra):
    return subprocess.Popen(
        [sys.executable, "-m", "diskferry", "download", "--cafile",
         srv.ca_file, "--request-size", "64K", "--workers", "1", "--json",
         *extra, url, str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def journal_ranges(part):
    try:
        lines = open(resume.journal_path(str(part))).read().splitlines()
    except FileNotFoundError:
        return []
    return [tuple(map(int, line.split())) for line in lines[1:] if line]


def wait_for_journal(proc, part):
    """Until the journal names some synced data (the download is midway)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if journal_ranges(part):
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("no checkpoint in the journal")


def run_download(srv, url, out, *extra):
    proc = subprocess.run(
        [sys.executable, "-m", "diskferry", "download", "--cafile",
         srv.ca_file, "--json", *extra, url, str(out)],
        capture_output=True, text=True, timeout=120)
    return proc


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_interrupted_download_resumes_byte_identical(slow_ticket, tmp_path,
                                                     sig):
    srv, url = slow_ticket
    out = tmp_path / "disk.raw"
    part = tmp_path / "disk.raw.part"
    proc = start_download(srv, url, out)
    wait_for_journal(proc, part)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode != 0
    assert not out.exists(), "an interrupted download looks complete"
    assert part.exists()
    if sig == signal.SIGINT:
        assert "--resume" in err
    synced = sum(e - s for s, e in journal_ranges(part))
    assert 0 < synced < SLOW_SIZE

    done = run_download(srv, url, out, "--resume")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    # What the journal named was not fetched again.
    assert summary["bytes"] <= SLOW_SIZE - synced
    assert summary["skipped_bytes"] >= synced
    assert out.read_bytes() == (tmp_path / "slow.raw").read_bytes()
    assert not part.exists()
    assert not os.path.exists(resume.journal_path(str(part)))


def test_resume_refetches_what_the_journal_does_not_name(daemons, make_ticket,
                                                         tmp_path):
    """Bytes in the .part that no journal line names (written, not known
    synced) are fetched again, whatever they hold."""
    srv = daemons.get("diskferry")
    image = tmp_path / "img.raw"
    content = os.urandom(4 * MiB)
    image.write_bytes(content)
    t = make_ticket(srv, image, 4 * MiB, ops=["read"])
    out = tmp_path / "out.raw"
    part = tmp_path / "out.raw.part"
    # A .part as a killed download leaves it: the first MiB synced and
    # named, garbage after it that the journal does not name.
    part.write_bytes(content[:MiB] + b"\xff" * (3 * MiB))
    journal = resume.Journal.create(str(part), 4 * MiB)
    journal.close()
    with open(resume.journal_path(str(part)), "a") as f:
        f.write(f"0 {MiB}\n{MiB} 20")          # the second line is torn
    done = run_download(srv, srv.image_url(t["uuid"]), out, "--resume")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["bytes"] == 3 * MiB
    assert out.read_bytes() == content


@pytest.fixture
def small_ticket(daemons, make_ticket, tmp_path):
    """A read ticket of 1 MiB of random data (``tmp_path / "img.raw"``)."""
    srv = daemons.get("diskferry")
    image = tmp_path / "img.raw"
    image.write_bytes(os.urandom(MiB))
    t = make_ticket(srv, image, MiB, ops=["read"])
    return srv, t, image


def test_resume_of_another_image_is_refused(small_ticket, tmp_path):
    srv, t, image = small_ticket
    out = tmp_path / "out.raw"
    part = tmp_path / "out.raw.part"
    part.write_bytes(b"\0" * (2 * MiB))
    resume.Journal.create(str(part), 2 * MiB).close()
    proc = run_download(srv, srv.image_url(t["uuid"]), out, "--resume")
    assert proc.returncode == 1
    assert "another image" in proc.stderr
    assert "run the same command with --resume" not in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()
    # Without --resume the .part is started over.
    proc = run_download(srv, srv.image_url(t["uuid"]), out)
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() == image.read_bytes()


def test_resume_without_a_journal_is_refused(small_ticket, tmp_path):
    srv, t, image = small_ticket
    (tmp_path / "out.raw.part").write_bytes(b"\0" * MiB)
    proc = run_download(srv, srv.image_url(t["uuid"]), tmp_path / "out.raw",
                        "--resume")
    assert proc.returncode == 1
    assert "has no journal" in proc.stderr


def test_resume_without_a_part_starts_afresh(small_ticket, tmp_path):
    srv, t, image = small_ticket
    out = tmp_path / "out.raw"
    proc = run_download(srv, srv.image_url(t["uuid"]), out, "--resume")
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() == image.read_bytes()


def test_resume_is_refused_for_qcow2(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "diskferry", "download", "--resume", "--format",
         "qcow2", "https://localhost:1/images/x", str(tmp_path / "x.qcow2")],
        capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "--resume continues raw downloads only" in proc.stderr


def test_torn_journal_line_is_cut_before_new_appends(tmp_path):
    part = tmp_path / "x.part"
    part.write_bytes(b"\0" * 100)
    resume.Journal.create(str(part), 100).close()
    with open(resume.journal_path(str(part)), "a") as f:
        f.write("0 10\n10 2")
    journal = resume.Journal.load(str(part), 100)
    assert journal.done == [(0, 10)]
    fd = os.open(part, os.O_WRONLY)
    try:
        journal.attach(fd)
        journal.record(50, 60)
        journal.checkpoint()
    finally:
        journal.close()
        os.close(fd)
    assert resume.Journal.load(str(part), 100).done == [(0, 10), (50, 60)]


def test_journal_outside_the_image_is_refused(tmp_path):
    part = tmp_path / "x.part"
    resume.Journal.create(str(part), 100).close()
    with open(resume.journal_path(str(part)), "a") as f:
        f.write("90 200\n")
    with pytest.raises(resume.ResumeError, match="outside the image"):
        resume.Journal.load(str(part), 100)
