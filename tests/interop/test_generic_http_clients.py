"""Interop: generic HTTP clients read an image straight from a transfer URL.

No diskferry or ovirt-imageio client is involved: qemu's own HTTPS block
driver converts the image, nbdkit's curl plugin serves it to nbdcopy, and
curl resumes an interrupted download. Each needs HEAD (the size) and
``Accept-Ranges: bytes``, which ovirt-imageio 2.5.1 does not answer, so
these run against diskferry only (tests/conformance/test_head.py shows
ovirt-imageio's 405).
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from servers import make_sparse_file

MiB = 1 << 20
SIZE = 8 * MiB


@pytest.fixture
def server(daemons):
    return daemons.get("diskferry")


@pytest.fixture
def source(tmp_path):
    """Data, a hole and zeros written as data, ending on a partial block."""
    chunks = {0: os.urandom(MiB), 3 * MiB: b"\0" * MiB,
              5 * MiB + 7: os.urandom(2 * MiB)}
    return make_sparse_file(tmp_path / "source.raw", SIZE, chunks)


@pytest.fixture
def url(server, source, make_ticket):
    t = make_ticket(server, source, SIZE, ops=["read"])
    return server.image_url(t["uuid"])


def run(*argv, **kwargs):
    return subprocess.run(argv, check=True, capture_output=True, timeout=120,
                          **kwargs)


def test_qemu_img_convert_https(url, source, tmp_path):
    spec = "json:" + json.dumps({"file.driver": "https", "file.url": url,
                                 "file.sslverify": False})
    info = json.loads(run("qemu-img", "info", "--output=json", spec).stdout)
    assert info["virtual-size"] == SIZE
    out = tmp_path / "copy.qcow2"
    # One coroutine (-m 1): with qemu-img 7.2's default of 8, about one
    # run in seven never ends, in qemu's main loop, after the daemon has
    # answered every GET in full and nothing is left unread on qemu's
    # sockets; 40 runs with -m 1 all ended.
    run("qemu-img", "convert", "-m", "1", "-f", "raw", "-O", "qcow2", spec,
        str(out))
    assert json.loads(run("qemu-img", "info", "--output=json",
                          str(out)).stdout)["format"] == "qcow2"
    run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(source),
        str(out))


def test_nbdkit_curl_nbdcopy(url, server, source, tmp_path):
    out = tmp_path / "copy.raw"
    run("nbdkit", "--exit-with-parent", "-U", "-", "curl", f"url={url}",
        f"cainfo={server.ca_file}", "--run", f'nbdcopy "$uri" {out}')
    assert out.read_bytes() == source.read_bytes()


def test_curl_resumes_download(url, server, source, tmp_path):
    out = tmp_path / "copy.raw"
    curl = ("curl", "--silent", "--show-error", "--fail",
            "--cacert", server.ca_file, "-o", str(out))
    # What an interrupted download leaves: the first part of the file.
    run(*curl, "--range", f"0-{3 * MiB - 1}", url)
    assert out.stat().st_size == 3 * MiB
    res = run(*curl, "--continue-at", "-", "--write-out",
              "%{http_code} %{size_download}", url)
    assert res.stdout.decode() == f"206 {SIZE - 3 * MiB}"
    assert out.read_bytes() == source.read_bytes()
