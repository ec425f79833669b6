"""The client commands bench/README.md gives the benchmark harness, run
as the harness runs them: placeholders substituted, ``/bin/sh -c``, exit
status 0 and a last stdout line that is JSON with "seconds" and
"bytes" (what the harness reads as the client's own timing)."""

import json
import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

from .helpers import MiB, empty_image, make_image

README = pathlib.Path(__file__).parents[2] / "bench" / "README.md"
SIZE = 4 * MiB


def templates():
    text = README.read_text()
    found = dict(re.findall(r'--client-cmd "diskferry:(\w+)=([^"]+)"', text))
    assert set(found) == {"download", "upload"}, found
    return found


def last_json(text):
    for line in reversed(text.strip().splitlines()):
        try:
            return json.loads(line)
        except ValueError:
            continue
    return None


@pytest.mark.parametrize("op", ["download", "upload"])
def test_bench_readme_client_commands_report_json(daemons, make_ticket,
                                                  tmp_path, op):
    srv = daemons.get("diskferry")
    image = tmp_path / "img.raw"
    content = make_image(image, SIZE, "sparse")
    target = empty_image(tmp_path / "target.raw", SIZE) if op == "upload" \
        else image
    t = make_ticket(srv, target, SIZE)
    out = tmp_path / "out.raw"
    values = {"unix": "always", "cafile": srv.ca_file,
              "url": srv.image_url(t["uuid"]),
              "file": str(image if op == "upload" else out)}
    command = templates()[op].replace("$PWD/.venv/bin/diskferry", "")
    command = re.sub(r"\{(\w+)\}", lambda m: shlex.quote(values[m[1]]),
                     command)
    argv = f"{shlex.quote(sys.executable)} -m diskferry{command}"
    proc = subprocess.run(["/bin/sh", "-c", argv], capture_output=True,
                          text=True, timeout=120, env=os.environ)
    assert proc.returncode == 0, proc.stderr
    report = last_json(proc.stdout)
    assert report is not None, proc.stdout
    assert report["seconds"] > 0
    assert report["image_bytes"] == SIZE
    assert report["transport"] == "unix"
    copied = target if op == "upload" else out
    assert copied.read_bytes() == content
