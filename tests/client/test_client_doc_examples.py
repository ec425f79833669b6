"""docs/client.md's examples run as written: its command lines (with
the placeholders URL, host and TICKET filled in) in one shell, in order,
and every Python example in one namespace that holds what the text says
it holds (``url``, ``host``, ``port``, ``ticket``, ``options``), beside
``ca.pem`` and ``disk.raw``, against a ticket on a 1 GiB image, the
README's. The "Backup and restore" walk-through has its own test
(tests/interop/test_backup_walkthrough.py); blocks of output (without
a language) are transcripts, not examples."""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import ssl
import subprocess
import sys
import tarfile
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from nbd_servers import qemu_img

from .helpers import MiB, empty_image, make_image

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "client.md"
VENV_BIN = Path(sys.executable).parent
GiB = 1024**3


def blocks(language: str, heading: str | None = None) -> list[str]:
    text = GUIDE.read_text()
    if heading is not None:
        start = text.index(heading)
        end = text.find("\n## ", start + 1)
        text = text[start:end if end > 0 else None]
    return re.findall(rf"```{language}\n(.*?)```", text, re.S)


@pytest.fixture
def workplace(daemons, make_ticket, tmp_path):
    """A folder with ca.pem and disk.raw (64 MiB, sparse), and the URL
    of a ticket on a fresh 1 GiB image."""
    srv = daemons.get("diskferry")
    image = empty_image(tmp_path / "image.raw", GiB)
    t = make_ticket(srv, image, GiB)
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(srv.ca_file, work / "ca.pem")
    make_image(work / "disk.raw", 64 * MiB, "sparse")
    return work, srv.image_url(t["uuid"])


def test_command_line_examples(workplace):
    work, url = workplace
    small = work / "small.raw"
    with open(small, "wb") as f:
        f.write(b"hello")
        f.truncate(100 * MiB)
    subprocess.run(["xz", "-0", small], check=True)
    examples = blocks("sh", "## Command line")
    assert len(examples) == 2, examples
    ticket = url.rsplit("/", 1)[1]
    host = urlsplit(url).netloc.rsplit(":", 1)[0]
    commands = "\n".join(examples)
    commands = commands.replace("host:54322", urlsplit(url).netloc)
    commands = commands.replace("TICKET", ticket).replace("host", host)
    commands = re.sub(r"\bURL\b", url, commands)
    env = dict(os.environ, PATH=f"{VENV_BIN}:{os.environ['PATH']}")
    run = subprocess.run(["bash", "-c", "set -euo pipefail\n" + commands],
                         cwd=work, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, f"{commands}\n{run.stdout}\n{run.stderr}"
    assert (work / "copy.raw").stat().st_size == GiB
    assert "uploaded 100.00 MiB of 1.00 GiB" in run.stdout


def test_python_examples(workplace, monkeypatch):
    work, url = workplace
    monkeypatch.chdir(work)
    qemu_img("convert", "-O", "qcow2", "disk.raw", "disk.qcow2")
    qemu_img("convert", "-O", "vmdk", "disk.raw", "disk1.vmdk")
    (work / "vm.ovf").write_text("<Envelope/>\n")
    with tarfile.open("vm.ova", "w", format=tarfile.USTAR_FORMAT) as ova:
        ova.add("vm.ovf")
        ova.add("disk1.vmdk")
    parts = urlsplit(url)
    namespace = {
        "url": url, "host": parts.hostname, "port": parts.port,
        "ticket": parts.path.rsplit("/", 1)[1], "options": _options(url),
    }
    examples = [b for b in blocks("python")
                if not b.startswith("# Before")]
    assert len(examples) >= 6, examples
    for n, example in enumerate(examples):
        exec(compile(example, f"{GUIDE.name} python example {n + 1}",
                     "exec"), namespace)
    assert Path("copy.raw").stat().st_size == GiB
    assert Path("backup.qcow2").exists()


def _options(url: str) -> dict[str, object]:
    """The JSON of OPTIONS on ``url``, as a program reads it."""
    parts = urlsplit(url)
    ctx = ssl.create_default_context(cafile="ca.pem")
    con = http.client.HTTPSConnection(parts.hostname, parts.port,
                                      context=ctx)
    con.request("OPTIONS", parts.path)
    return json.loads(con.getresponse().read())
