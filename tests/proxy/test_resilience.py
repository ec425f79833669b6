"""A proxy's upstream connections break and time out; transfers do not.

- A relay between proxy and upstream resets the proxy's first upstream
  connection in the middle of a request body (upload) or an answer
  (download): the proxy sends that request again on a new connection and
  the client, of either kind, never notices.
- The upstream closes idle connections after its ticket's
  inactivity_timeout (1 s here): a client pausing longer between requests
  goes on, the proxy reopening the connection before using it instead of
  failing a request on it.
"""

from __future__ import annotations

import re
import time

import pytest

from client.helpers import MiB, empty_image, log_offset, make_image
from diskferry import client
from diskferry.daemon.http import accesslog

from .test_transfers import download, upload

SIZE = 32 * MiB

RESENT = "sending it again on a new connection"


@pytest.mark.parametrize("client_kind", ["ovirt_imageio", "diskferry"])
def test_upload_survives_a_cut_upstream_connection(route, upstream, relay,
                                                   tmp_path, client_kind):
    # Upstream without a local socket: the proxy must go through the relay.
    cutter = relay(upstream("diskferry-tls"), 3 * MiB, "up")
    content = make_image(tmp_path / "src.raw", SIZE, "full")
    target = empty_image(tmp_path / "target.raw", SIZE)
    r = route("diskferry", "diskferry-tls", target, SIZE,
              via=("127.0.0.1", cutter.port))
    mark = log_offset(r.proxy)
    upload(client_kind, tmp_path / "src.raw", r.url, r.proxy.ca_file)
    assert cutter.cuts == 1
    assert target.read_bytes() == content
    assert RESENT in r.proxy.log_text()[mark:]


@pytest.mark.parametrize("client_kind", ["ovirt_imageio", "diskferry"])
def test_download_survives_a_cut_upstream_connection(route, upstream, relay,
                                                     tmp_path, client_kind):
    cutter = relay(upstream("diskferry-tls"), 3 * MiB, "down")
    content = make_image(tmp_path / "src.raw", SIZE, "full")
    r = route("diskferry", "diskferry-tls", tmp_path / "src.raw", SIZE,
              ops=("read",), via=("127.0.0.1", cutter.port))
    mark = log_offset(r.proxy)
    download(client_kind, r.url, tmp_path / "out.raw", r.proxy.ca_file)
    assert cutter.cuts == 1
    assert (tmp_path / "out.raw").read_bytes() == content
    assert RESENT in r.proxy.log_text()[mark:]


@pytest.mark.parametrize("upstream_name",
                         ["diskferry", "diskferry-tls", "ovirt-imageio"])
def test_pauses_past_the_upstreams_inactivity_timeout(route, tmp_path,
                                                      upstream_name):
    path = empty_image(tmp_path / "img", 4 * MiB)
    r = route("diskferry", upstream_name, path, 4 * MiB, inactivity_timeout=1)
    proxy_mark, upstream_mark = log_offset(r.proxy), log_offset(r.upstream)
    first, second = b"a" * MiB, b"b" * MiB
    with client.open(r.url, "w", cafile=r.proxy.ca_file) as s:
        s.write(first, 0, flush=True)
        time.sleep(2.5)
        s.write(second, MiB, flush=True)
        time.sleep(2.5)
        assert s.read(0, 2 * MiB) == first + second
    # No request was sent on a connection the upstream had closed.
    assert RESENT not in r.proxy.log_text()[proxy_mark:]
    if r.upstream.name == "diskferry":
        # Three connections at least: the upstream did close them. (The
        # last request is logged after its answer: wait for it.)
        ticket_id = r.upstream_ticket["uuid"]
        pattern = (rf"\[((?:local|remote)/\d+)\] \S+ [A-Z]+ /images/"
                   rf"{re.escape(accesslog.secret_prefix(ticket_id))}")
        deadline = time.monotonic() + 5
        while True:
            text = r.upstream.log_text()[upstream_mark:]
            connections = set(re.findall(pattern, text))
            if len(connections) >= 3 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert len(connections) >= 3, text
