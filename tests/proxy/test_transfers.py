"""Whole images through a proxy: both clients, both directions, full and
sparse, through a diskferry proxy in front of diskferry (over its UNIX
socket, over TLS only, and over plain HTTP) and in front of
ovirt-imageio, and through an ovirt-imageio proxy in front of diskferry.
The bytes must be identical, holes must stay holes (as far as the
upstream reports them), and the upstream's own log must show that the
data reached it on the transport the proxy should have chosen."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from ovirt_imageio import client as ovirt_client

from client.helpers import (
    MiB,
    allocated,
    data_transports,
    empty_image,
    log_offset,
    make_image,
)

SIZE = 32 * MiB

ROUTES = [
    ("diskferry", "diskferry"),
    ("diskferry", "diskferry-tls"),
    ("diskferry", "diskferry-http"),
    ("diskferry", "ovirt-imageio"),
    ("ovirt-imageio", "diskferry"),
]
ROUTE_IDS = [f"{p}-proxy-to-{u}" for p, u in ROUTES]

#: Which side of the upstream the proxy's requests should arrive on; None:
#: not ours to decide (ovirt-imageio's proxy).
EXPECTED_SIDE = {
    ("diskferry", "diskferry"): "local",
    ("diskferry", "diskferry-tls"): "remote",
    ("diskferry", "diskferry-http"): "remote",
    ("diskferry", "ovirt-imageio"): "local",  # from the proxy's log
    ("ovirt-imageio", "diskferry"): None,
}

#: Allocation a copy may add to the source's: file system block rounding
#: at the unaligned ends of data runs.
SLACK = MiB


def diskferry(*args):
    proc = subprocess.run([sys.executable, "-m", "diskferry", *map(str, args)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc


def upload(client, src, url, cafile):
    if client == "ovirt_imageio":
        ovirt_client.upload(str(src), url, cafile)
    else:
        diskferry("upload", "--cafile", cafile, src, url)


def download(client, url, dst, cafile):
    if client == "ovirt_imageio":
        ovirt_client.download(url, str(dst), cafile, fmt="raw")
    else:
        diskferry("download", "--cafile", cafile, url, dst)


def check_side(route, marks):
    """The data reached the upstream on the side expected: as the upstream
    logged it (diskferry logs each request; ovirt-imageio only when a
    connection closes, which the proxy's pool delays), or as the proxy
    logged its choice."""
    upstream_mark, proxy_mark = marks
    expected = EXPECTED_SIDE[(route.proxy.name, _upstream_name(route))]
    if route.upstream.name == "ovirt-imageio":
        chosen = route.proxy.log_text()[proxy_mark:]
        assert "using unix socket" in chosen
        return
    found = data_transports(route.upstream, upstream_mark,
                            route.upstream_ticket["uuid"])
    assert found, "no data request reached the upstream"
    if expected is not None:
        assert found == {expected}


def _upstream_name(route):
    if route.upstream.name == "diskferry" and route.upstream.local_socket is None:
        return "diskferry-tls" if route.upstream.tls else "diskferry-http"
    return route.upstream.name


@pytest.mark.parametrize("layout", ["full", "sparse"])
@pytest.mark.parametrize("client", ["ovirt_imageio", "diskferry"])
@pytest.mark.parametrize("proxy_kind,upstream_name", ROUTES, ids=ROUTE_IDS)
def test_upload(route, tmp_path, proxy_kind, upstream_name, client, layout):
    content = make_image(tmp_path / "src.raw", SIZE, layout)
    target = empty_image(tmp_path / "target.raw", SIZE)
    r = route(proxy_kind, upstream_name, target, SIZE, sparse=True)
    marks = log_offset(r.upstream), log_offset(r.proxy)
    upload(client, tmp_path / "src.raw", r.url, r.proxy.ca_file)
    assert target.read_bytes() == content
    assert allocated(target) <= allocated(tmp_path / "src.raw") + SLACK
    check_side(r, marks)


@pytest.mark.parametrize("layout", ["full", "sparse"])
@pytest.mark.parametrize("client", ["ovirt_imageio", "diskferry"])
@pytest.mark.parametrize("proxy_kind,upstream_name", ROUTES, ids=ROUTE_IDS)
def test_download(route, tmp_path, proxy_kind, upstream_name, client, layout):
    content = make_image(tmp_path / "src.raw", SIZE, layout)
    r = route(proxy_kind, upstream_name, tmp_path / "src.raw", SIZE,
              ops=("read",))
    marks = log_offset(r.upstream), log_offset(r.proxy)
    out = tmp_path / "out.raw"
    download(client, r.url, out, r.proxy.ca_file)
    assert out.read_bytes() == content
    check_side(r, marks)
    # Holes are kept as far as the upstream reports them: ovirt-imageio
    # reports a raw file as all data.
    assert allocated(out) <= upstream_data_bytes(r) + SLACK


def upstream_data_bytes(route):
    """Bytes the upstream reports as data, asked directly."""
    con = route.upstream.remote_connection()
    try:
        con.request("GET", f"/images/{route.upstream_ticket['uuid']}/extents")
        res = con.getresponse()
        assert res.status == 200
        extents = json.loads(res.read())
    finally:
        con.close()
    return sum(e["length"] for e in extents if not e["zero"])
