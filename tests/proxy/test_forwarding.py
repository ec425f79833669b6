"""What a proxy forwards and what it answers itself: OPTIONS never
promises what the upstream cannot do, checksums are computed upstream,
extents, zero and flush reach the upstream as asked, and upstream errors
come back with their status and message."""

from __future__ import annotations

import json
import os
import re
import time

import pytest

import nbd_servers
import servers
from client.helpers import MiB, empty_image
from diskferry import client
from diskferry.daemon.http import accesslog

SIZE = 8 * MiB


def request(srv, method, path, body=None, headers=None):
    """One request on a new connection to the remote service: (status,
    headers, body bytes)."""
    con = srv.remote_connection()
    try:
        if isinstance(body, dict):
            body = json.dumps(body).encode()
        con.request(method, path, body=body, headers=headers or {})
        res = con.getresponse()
        return res.status, res.headers, res.read()
    finally:
        con.close()


def options(srv, ticket_id):
    status, headers, body = request(srv, "OPTIONS", f"/images/{ticket_id}")
    assert status == 200, body
    return headers, json.loads(body)


def logged(ticket_id):
    """How the daemon's log names a ticket: never whole."""
    return accesslog.secret_prefix(ticket_id)


def requests_of(srv, mark, ticket_id, until):
    """The upstream's request log lines naming ``ticket_id`` since ``mark``
    (diskferry's log: "METHOD /images/ID..."), once ``until(lines)`` holds
    or a few seconds passed: a request is logged after its answer."""
    deadline = time.monotonic() + 5
    while True:
        text = srv.log_text()[mark:]
        lines = re.findall(
            rf"\] \S+ ([A-Z]+) (/images/{re.escape(logged(ticket_id))}\S*)",
            text)
        if until(lines) or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


def log_once(srv, text):
    """``srv``'s log once it holds ``text``, or after a few seconds: the
    cause of a failed request is logged after its answer."""
    deadline = time.monotonic() + 5
    while text not in (log := srv.log_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return log


def image_with_data(path):
    data = os.urandom(SIZE)
    path.write_bytes(data)
    return data


# --- OPTIONS -----------------------------------------------------------------


@pytest.mark.parametrize("upstream_name",
                         ["diskferry", "diskferry-tls", "ovirt-imageio"])
def test_options_leave_out_what_a_read_only_upstream_cannot_do(
        route, tmp_path, upstream_name):
    image_with_data(tmp_path / "img")
    r = route("diskferry", upstream_name, tmp_path / "img", SIZE,
              ops=("read", "write"), upstream_ops=("read",))
    up_headers, upstream = options(r.upstream, r.upstream_ticket["uuid"])
    headers, proxied = options(r.proxy, r.ticket["uuid"])
    assert set(proxied["features"]) == {"checksum", "extents"}
    # Nor does Allow offer what the upstream's ticket refuses.
    assert "PUT" not in up_headers["Allow"]
    assert headers["Allow"] == "OPTIONS,GET,HEAD"
    assert set(proxied["features"]) <= set(upstream["features"])
    assert proxied["max_readers"] <= upstream["max_readers"]
    assert proxied["max_writers"] <= upstream["max_writers"]
    # The proxy's own socket and identity, never the upstream's.
    _, own = options(r.proxy, "*")
    assert proxied["unix_socket"] == own["unix_socket"] != \
        upstream.get("unix_socket")
    # A write anyway: the upstream's refusal (before it read the body),
    # passed back.
    status, _, body = request(r.proxy, "PUT", f"/images/{r.ticket['uuid']}",
                              bytes(3 * MiB))
    assert status == 403
    assert body.strip()


def test_options_follow_an_upstream_that_allows_one_connection(
        route, tmp_path):
    """An NBD export without multi-conn takes one connection: the proxy
    never offers more, although its own limit is 8."""
    path = empty_image(tmp_path / "img", SIZE)
    export = nbd_servers.start_export("qemu-nbd", path, shared=1)
    try:
        r = route("diskferry", "diskferry", path, SIZE, url=export.url)
        _, upstream = options(r.upstream, r.upstream_ticket["uuid"])
        _, proxied = options(r.proxy, r.ticket["uuid"])
        assert upstream["max_readers"] == upstream["max_writers"] == 1
        assert proxied["max_readers"] == proxied["max_writers"] == 1
        assert set(proxied["features"]) == {"checksum", "extents", "flush",
                                            "zero"}
    finally:
        export.stop()


# --- checksum ----------------------------------------------------------------


@pytest.mark.parametrize("upstream_name", ["diskferry", "ovirt-imageio"])
def test_checksum_is_the_upstreams(route, tmp_path, upstream_name):
    image_with_data(tmp_path / "img")
    r = route("diskferry", upstream_name, tmp_path / "img", SIZE,
              ops=("read",))
    query = "?algorithm=sha256&block_size=1048576"
    status, _, direct = request(
        r.upstream, "GET", f"/images/{r.upstream_ticket['uuid']}/checksum" + query)
    assert status == 200
    status, _, proxied = request(
        r.proxy, "GET", f"/images/{r.ticket['uuid']}/checksum" + query)
    assert status == 200, proxied
    assert json.loads(proxied) == json.loads(direct)
    assert json.loads(proxied)["algorithm"] == "sha256"


def test_checksum_does_not_read_the_image_through_the_proxy(route, tmp_path):
    image_with_data(tmp_path / "img")
    r = route("diskferry", "diskferry", tmp_path / "img", SIZE, ops=("read",))
    mark = len(r.upstream.log_text())
    status, _, body = request(r.proxy, "GET",
                              f"/images/{r.ticket['uuid']}/checksum")
    assert status == 200, body
    up_id = r.upstream_ticket["uuid"]
    forwarded = ("GET", f"/images/{logged(up_id)}/checksum")
    lines = requests_of(r.upstream, mark, up_id, lambda x: forwarded in x)
    assert forwarded in lines
    assert not [line for line in lines
                if line == ("GET", f"/images/{logged(up_id)}")]
    # The upstream counts bytes it sent as data: none.
    assert r.upstream.get_ticket(up_id)["transferred"] == 0


# --- extents, zero, flush ----------------------------------------------------


@pytest.mark.parametrize("upstream_name", ["diskferry", "ovirt-imageio"])
def test_extents_of_a_range_are_the_upstreams(route, tmp_path, upstream_name):
    path = empty_image(tmp_path / "img", SIZE)
    with open(path, "r+b") as f:
        f.seek(MiB)
        f.write(os.urandom(MiB))
    r = route("diskferry", upstream_name, path, SIZE, ops=("read",))
    _, _, whole = request(r.upstream, "GET",
                          f"/images/{r.upstream_ticket['uuid']}/extents")
    start, length = MiB // 2, 2 * MiB
    status, _, body = request(
        r.proxy, "GET",
        f"/images/{r.ticket['uuid']}/extents?start={start}&length={length}")
    assert status == 200, body
    got = json.loads(body)
    assert got[0]["start"] == start
    assert got[-1]["start"] + got[-1]["length"] == start + length
    # The same allocation the upstream reports, cut to the range.
    for e in got:
        covering = [u for u in json.loads(whole)
                    if u["start"] <= e["start"] < u["start"] + u["length"]]
        assert covering[0]["zero"] == e["zero"]


def test_dirty_extents_unavailable_upstream_is_the_upstreams_404(
        route, tmp_path):
    path = empty_image(tmp_path / "img", SIZE)
    r = route("diskferry", "diskferry", path, SIZE, ops=("read",))
    r.proxy.add_ticket(dict(r.ticket, dirty=True))
    status, _, body = request(
        r.proxy, "GET", f"/images/{r.ticket['uuid']}/extents?context=dirty")
    assert status == 404
    _, _, direct = request(
        r.upstream, "GET",
        f"/images/{r.upstream_ticket['uuid']}/extents?context=dirty")
    assert body.strip() == direct.strip()


@pytest.mark.parametrize("upstream_name", ["diskferry", "ovirt-imageio"])
def test_dirty_extents_are_the_upstreams(route, backup_disk, upstream_name):
    """Incremental backup through the proxy: the bitmap's extents, whole
    and for a range."""
    size = 16 * MiB
    with nbd_servers.start_export("qemu-nbd", backup_disk, fmt="qcow2",
                                  read_only=True,
                                  bitmap="checkpoint-1") as export:
        r = route("diskferry", upstream_name, backup_disk, size,
                  ops=("read",), url=export.url, dirty=True)
        r.proxy.add_ticket(dict(r.ticket, dirty=True))
        query = "/extents?context=dirty"
        _, _, direct = request(
            r.upstream, "GET", f"/images/{r.upstream_ticket['uuid']}{query}")
        status, _, whole = request(
            r.proxy, "GET", f"/images/{r.ticket['uuid']}{query}")
        assert status == 200, whole
        start, length = MiB + 32 * 1024, 5 * MiB
        status, _, part = request(
            r.proxy, "GET", f"/images/{r.ticket['uuid']}{query}"
            f"&start={start}&length={length}")
        assert status == 200, part
    direct = json.loads(direct)
    assert any(e["dirty"] for e in direct)
    assert json.loads(whole) == direct
    assert json.loads(part) == clipped(direct, start, start + length)


def clipped(extents, start, end):
    out = []
    for e in extents:
        s, t = max(e["start"], start), min(e["start"] + e["length"], end)
        if s < t:
            out.append(dict(e, start=s, length=t - s))
    return out


@pytest.mark.parametrize("flush", [True, False])
def test_put_flush_reaches_the_upstream_as_asked(route, tmp_path, flush):
    path = empty_image(tmp_path / "img", SIZE)
    r = route("diskferry", "diskferry", path, SIZE)
    mark = len(r.upstream.log_text())
    query = "" if flush else "?flush=n"
    data = os.urandom(3 * MiB)
    status, _, body = request(r.proxy, "PUT",
                              f"/images/{r.ticket['uuid']}{query}", data,
                              {"Content-Range": f"bytes {MiB}-{4 * MiB - 1}/*"})
    assert status == 200, body
    assert path.read_bytes()[MiB:4 * MiB] == data
    expected = 1 if flush else 0
    lines = requests_of(
        r.upstream, mark, r.upstream_ticket["uuid"],
        lambda x: [m for m, _ in x].count("PATCH") == expected and
        [m for m, _ in x].count("PUT") >= 2)
    methods = [m for m, _ in lines]
    # A PUT per slot, then one flush of the whole image, or none.
    assert methods.count("PUT") >= 2
    assert methods.count("PATCH") == expected


@pytest.mark.parametrize("upstream_name", ["diskferry", "ovirt-imageio"])
def test_zero_is_forwarded(route, tmp_path, upstream_name):
    path = tmp_path / "img"
    data = image_with_data(path)
    r = route("diskferry", upstream_name, path, SIZE, sparse=True)
    status, _, body = request(r.proxy, "PATCH", f"/images/{r.ticket['uuid']}",
                              {"op": "zero", "offset": MiB, "size": 2 * MiB,
                               "flush": True})
    assert status == 200, body
    assert path.read_bytes() == data[:MiB] + bytes(2 * MiB) + data[3 * MiB:]
    # Punched, as the upstream's sparse ticket says.
    assert os.stat(path).st_blocks * 512 <= SIZE - 2 * MiB


# --- errors ------------------------------------------------------------------


def test_a_feature_the_upstream_lacks_is_a_bad_request(route, tmp_path):
    """The proxy's ticket allows writing, the upstream's does not: zero is
    not offered, and a client that asks anyway gets a 400 naming it, on a
    connection that goes on."""
    path = tmp_path / "img"
    data = image_with_data(path)
    r = route("diskferry", "diskferry", path, SIZE, ops=("read", "write"),
              upstream_ops=("read",))
    con = r.proxy.remote_connection()
    try:
        con.request("PATCH", f"/images/{r.ticket['uuid']}",
                    body=json.dumps({"op": "zero", "size": MiB}).encode())
        res = con.getresponse()
        assert res.status == 400
        assert res.read() == (b"The server behind this proxy does not "
                              b"offer zero for this image\n")
        con.request("OPTIONS", "/images/*")
        assert con.getresponse().status == 200
    finally:
        con.close()
    assert path.read_bytes() == data


def test_upstream_errors_come_back_with_status_and_message(route, tmp_path):
    path = empty_image(tmp_path / "img", SIZE)
    r = route("diskferry", "diskferry", path, SIZE)
    with client.open(r.url, "w", cafile=r.proxy.ca_file) as s:
        s.write(b"a" * 4096, 0, flush=True)
        # The upstream's ticket goes away; the proxy's stays.
        r.upstream.delete_ticket(r.upstream_ticket["uuid"])
        with pytest.raises(client.HTTPError) as e:
            s.read(0, 4096)
    assert e.value.status == 403
    assert r.upstream_ticket["uuid"] in e.value.message
    # The proxy still serves.
    status, _, _ = request(r.proxy, "OPTIONS", "/images/*")
    assert status == 200


@pytest.mark.parametrize("url", [
    "https:///images/x",
    "https://host:99999/images/x",
    "https://host/tickets/x",
    "https://host/images/",
    "https://host/images/a/b",
])
def test_bad_upstream_urls_are_refused_when_installed(proxies, url):
    px = proxies("diskferry")
    status, _, body = px.control("PUT", "/tickets/t1", {
        "uuid": "t1", "size": 1, "url": url, "ops": ["read"], "timeout": 60})
    assert status == 400
    assert b"url" in body


def test_an_unreachable_upstream_is_a_500_and_the_proxy_goes_on(proxies):
    px = proxies("diskferry")
    port = _closed_port()
    px.add_ticket({"uuid": "t2", "size": MiB, "ops": ["read"], "timeout": 60,
                   "url": f"https://127.0.0.1:{port}/images/x"})
    try:
        status, _, body = request(px, "GET", "/images/t2")
        assert status == 500
        assert f"127.0.0.1:{port}".encode() not in body  # no internals
        status, _, _ = request(px, "OPTIONS", "/images/*")
        assert status == 200
    finally:
        px.delete_ticket("t2")


def _closed_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_ticket_url_leading_back_to_the_proxy_fails_once(proxies):
    """Opening the ticket asks the proxy itself, whose answer needs the
    ticket opened: the inner request waits for the outer, at most the
    connect timeout, and both fail; no request chain without end."""
    px = proxies("diskferry")
    mark = len(px.log_text())
    px.add_ticket({"uuid": "loop", "size": MiB, "ops": ["read"],
                   "timeout": 60, "url": px.image_url("loop")})
    try:
        status, _, _ = request(px, "GET", "/images/loop")
        assert status == 500
        status, _, _ = request(px, "OPTIONS", "/images/*")
        assert status == 200
    finally:
        px.delete_ticket("loop")
    # Access log lines: the client's GET, and one OPTIONS of its own.
    requests = re.findall(
        rf"\] \S+ (GET|OPTIONS) /images/{re.escape(logged('loop'))} ",
        px.log_text()[mark:])
    assert sorted(requests) == ["GET", "OPTIONS"]


def test_an_upstream_whose_certificate_is_not_trusted_is_refused(
        proxies, tmp_path):
    """The upstream has a CA of its own, which the proxy's
    [backend_http] ca_file (here its [tls] ca_file) does not hold."""
    up = servers.start_server("diskferry", tmp_path / "stranger",
                              local_socket=None)
    try:
        path = empty_image(tmp_path / "img", MiB)
        ticket = servers.ticket_dict(path, MiB, ops=["read"])
        up.add_ticket(ticket)
        px = proxies("diskferry")
        px.add_ticket(dict(ticket, url=up.image_url(ticket["uuid"])))
        try:
            status, _, _ = request(px, "GET", f"/images/{ticket['uuid']}")
            assert status == 500
            assert "CERTIFICATE_VERIFY_FAILED" in log_once(
                px, "CERTIFICATE_VERIFY_FAILED")
        finally:
            px.delete_ticket(ticket["uuid"])
    finally:
        up.stop()


def test_an_upstream_gone_midway_fails_requests_cleanly(proxies, pki,
                                                        tmp_path):
    up = servers.start_server("diskferry", tmp_path / "upstream", pki=pki,
                              local_socket=None)
    path = empty_image(tmp_path / "img", MiB)
    ticket = servers.ticket_dict(path, MiB, ops=["read"])
    up.add_ticket(ticket)
    px = proxies("diskferry")
    px.add_ticket(dict(ticket, url=up.image_url(ticket["uuid"])))
    try:
        with client.open(px.image_url(ticket["uuid"]), "r",
                         cafile=px.ca_file, unix="never") as s:
            assert s.read(0, 4096) == bytes(4096)
            up.stop()
            # An answer already started is cut short: a client resumes.
            with pytest.raises(client.ConnectionFailed):
                s.read(0, 4096)
            # Anything else is a 500.
            with pytest.raises(client.HTTPError) as e:
                s.extents()
        assert e.value.status == 500
        assert "server behind this proxy failed" in e.value.message
        assert str(up.port) not in e.value.message  # details in the log only
        status, _, _ = request(px, "OPTIONS", "/images/*")
        assert status == 200
    finally:
        up.stop()
        px.delete_ticket(ticket["uuid"])
