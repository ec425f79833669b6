"""``diskferry ticket`` as a person uses it: every form of IMAGE a ticket
takes, ids, and what ``list`` and ``show`` print, against a real daemon,
real files and a real qemu-nbd."""

import json
import os
import re
import subprocess
import sys
import time

import pytest

from servers import ticket_dict


def ticket_cmd(server, *args):
    return subprocess.run(
        [sys.executable, "-m", "diskferry", "ticket", "--socket",
         server.control_socket, *map(str, args)],
        capture_output=True, text=True, timeout=60)


def client_cmd(server, *args):
    return subprocess.run(
        [sys.executable, "-m", "diskferry", *map(str, args), "--cafile",
         server.ca_file],
        capture_output=True, text=True, timeout=120)


@pytest.fixture
def df(daemons):
    return daemons.get("diskferry")


def add(server, *args):
    run = ticket_cmd(server, "add", *args)
    assert run.returncode == 0, run.stderr
    return run.stdout.strip()


# --- file names with characters a URL gives a meaning to ---------------------


@pytest.mark.parametrize("name", [
    "what?.raw", "a#b.raw", "100%.raw", "50%41.raw", "with space.raw",
    "all ?#% of them.raw",
])
def test_file_names_name_the_file(df, tmp_path, name):
    """The ticket serves the file named, not the one a URL parser reads
    in its name: ``a#b`` is not ``a``, ``50%41`` is not ``50A``; it is
    read and written by a download and an upload."""
    image = tmp_path / name
    image.write_bytes(b"right" * 1000)
    for decoy in ("what", "a", "100", "50A.raw", "with", "all "):
        (tmp_path / decoy).write_bytes(b"wrong" * 1000)
    ticket_id = add(df, "--ops", "read,write", image)
    url = df.image_url(ticket_id)
    try:
        got = tmp_path / "got.raw"
        run = client_cmd(df, "download", "--quiet", url, got)
        assert run.returncode == 0, run.stderr
        assert got.read_bytes() == b"right" * 1000
        new = tmp_path / "new.raw"
        new.write_bytes(b"fresh" * 1000)
        run = client_cmd(df, "upload", "--quiet", new, url)
        assert run.returncode == 0, run.stderr
        assert image.read_bytes() == b"fresh" * 1000
        assert df.get_ticket(ticket_id)["size"] == 5000
    finally:
        df.delete_ticket(ticket_id)
    for decoy in ("what", "a", "100", "50A.raw", "with", "all "):
        assert (tmp_path / decoy).read_bytes() == b"wrong" * 1000


# --- ticket ids ---------------------------------------------------------------


@pytest.mark.parametrize("action", [
    ["add", "--id", "{id}", "disk.raw"], ["show", "{id}"], ["del", "{id}"],
    ["extend", "{id}", "60"],
])
@pytest.mark.parametrize("bad_id", ["sp ace", "a/b", "q?x", "h#x", "50%",
                                    "..", "é", ""])
def test_ids_a_url_cannot_carry_are_refused(df, action, bad_id):
    argv = [arg.replace("{id}", bad_id) for arg in action]
    run = ticket_cmd(df, *argv)
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert "is not a ticket id" in last
    assert "letters, digits, '-', '_', '.' and '~' only" in last


def test_ids_of_unreserved_characters_work(df, tmp_path):
    image = tmp_path / "disk.raw"
    image.write_bytes(b"x" * 4096)
    for ticket_id in ("Up-1_a.b~c", "9", "...", "a..b"):
        assert add(df, "--id", ticket_id, image) == ticket_id
        assert df.get_ticket(ticket_id)["uuid"] == ticket_id
        run = client_cmd(df, "info", "--json", df.image_url(ticket_id))
        assert run.returncode == 0, run.stderr
        assert json.loads(run.stdout)["size"] == 4096
        assert ticket_cmd(df, "del", ticket_id).returncode == 0


def test_relative_image_is_made_absolute(df, tmp_path):
    (tmp_path / "in here.raw").write_bytes(b"y" * 512)
    run = subprocess.run(
        [sys.executable, "-m", "diskferry", "ticket", "--socket",
         df.control_socket, "add", "in here.raw"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    info = df.get_ticket(run.stdout.strip())
    df.delete_ticket(info["uuid"])
    assert info["url"] == "file://" + os.fspath(tmp_path).replace(
        " ", "%20") + "/in%20here.raw"


# --- list and show: a table for people, the protocol's JSON for scripts ------


def _expires_at(text):
    """The wall-clock time of an EXPIRES cell, in seconds since the epoch."""
    match = re.search(r"(\d{4}-\d\d-\d\d )?(\d\d:\d\d:\d\d) \(in (\w+)\)",
                      text)
    assert match, text
    day = match[1] or time.strftime("%Y-%m-%d ")
    return time.mktime(time.strptime(day + match[2], "%Y-%m-%d %H:%M:%S"))


def test_list_prints_a_table(df, tmp_path):
    image = tmp_path / "disk one.raw"
    image.write_bytes(b"d" * 8192)
    big = tmp_path / "big.raw"
    big.write_bytes(b"")
    first = add(df, "--ops", "read", "--timeout", "300", image)
    second = add(df, "--id", "table-test-2", "--ops", "read,write", "--size",
                 "1G", "--timeout", "7200", big)
    try:
        run = client_cmd(df, "download", "--quiet", df.image_url(first),
                         tmp_path / "copy.raw")
        assert run.returncode == 0, run.stderr
        run = ticket_cmd(df, "list")
        assert run.returncode == 0, run.stderr
        lines = run.stdout.splitlines()
        assert lines[0].split() == ["ID", "URL", "OPS", "SIZE", "TRANSFERRED",
                                    "CONNECTIONS", "IDLE", "EXPIRES"]
        assert first not in run.stdout and "table-test-2" not in run.stdout
        row = next(line for line in lines if line.startswith(first[:4] + "..."))
        assert f"file://{tmp_path}/disk%20one.raw" in row
        assert " read " in row and "8.00 KiB  8.00 KiB" in row
        assert abs(_expires_at(row) - (time.time() + 300)) < 10
        assert re.search(r"\(in [45]m\)$", row), row
        row = next(line for line in lines if line.startswith("tab..."))
        assert "read,write" in row and "1.00 GiB" in row
        assert re.search(r"\(in (2h|1h 59m)\)$", row), row

        run = ticket_cmd(df, "list", "--full-ids")
        assert first in run.stdout and "table-test-2" in run.stdout
    finally:
        df.delete_ticket(first)
        df.delete_ticket(second)


def test_list_json_is_the_protocols(df, tmp_path):
    image = tmp_path / "disk.raw"
    image.write_bytes(b"j" * 4096)
    ticket_id = add(df, image)
    try:
        run = ticket_cmd(df, "list", "--json")
        assert run.returncode == 0, run.stderr
        listed = {t["uuid"]: t for t in json.loads(run.stdout)}
        status, _, body = df.control("GET", "/tickets/")
        assert status == 200
        answered = {t["uuid"]: t for t in json.loads(body)}
        assert listed.keys() == answered.keys()
        for key, value in answered[ticket_id].items():
            if key not in ("expires", "idle_time"):
                assert listed[ticket_id][key] == value, key
        assert abs(listed[ticket_id]["expires"] -
                   answered[ticket_id]["expires"]) < 5

        run = ticket_cmd(df, "show", "--json", ticket_id)
        assert run.returncode == 0, run.stderr
        assert json.loads(run.stdout).keys() == answered[ticket_id].keys()
    finally:
        df.delete_ticket(ticket_id)


def test_show_prints_a_field_a_line(df, tmp_path):
    image = tmp_path / "disk.raw"
    image.write_bytes(b"s" * 4096)
    ticket_id = add(df, "--id", "show-me-please", "--transfer-id", "t-show",
                    "--sparse", "--timeout", "600", image)
    try:
        run = ticket_cmd(df, "show", ticket_id)
        assert run.returncode == 0, run.stderr
        fields = dict(line.split(":", 1) for line in run.stdout.splitlines())
        fields = {key: value.strip() for key, value in fields.items()}
        assert fields["id"] == "sho..."
        assert fields["url"] == f"file://{image}"
        assert fields["ops"] == "read"
        assert fields["size"] == "4.00 KiB"
        assert fields["transfer id"] == "t-show"
        assert fields["sparse"] == "yes" and fields["dirty"] == "no"
        assert fields["timeout"] == "600"
        assert re.search(r"\(in (10|9)m\)$", fields["expires"])
        run = ticket_cmd(df, "show", "--full-ids", ticket_id)
        assert "show-me-please" in run.stdout
    finally:
        df.delete_ticket(ticket_id)


def test_list_without_tickets(tmp_path):
    import servers

    with servers.start_server("diskferry", tmp_path) as server:
        run = ticket_cmd(server, "list")
        assert run.returncode == 0, run.stderr
        assert run.stdout == "" and run.stderr == "no tickets\n"
        assert ticket_cmd(server, "list", "--json").stdout.strip() == "[]"


@pytest.mark.parametrize("seconds,text", [
    (0, "0s"), (45, "45s"), (59.6, "1m"), (300, "5m"), (3600, "1h"),
    (3900, "1h 5m"), (86400 * 2, "2d"), (86400 + 7200, "1d 2h"),
])
def test_durations(seconds, text):
    from diskferry.cli import tickettable

    assert tickettable.duration(seconds) == text


@pytest.mark.parametrize("ticket_id,shown", [
    ("6f1c4a3e-0000-4000-8000-000000000000", "6f1c..."), ("abcdefgh", "ab..."),
    ("abc", "..."),
])
def test_ids_shortened_as_in_logs(ticket_id, shown):
    from diskferry.cli import tickettable
    from diskferry.daemon.http import accesslog

    assert tickettable.short_id(ticket_id) == shown
    assert accesslog.secret_prefix(ticket_id) == shown


# --- a transfer URL as IMAGE: a proxy ticket ----------------------------------


@pytest.fixture
def upstream_ticket(tmp_path):
    """Adds a ticket for a 3 MiB image on an upstream daemon; yields its
    transfer URL and the image's path."""
    added = []

    def make(server):
        image = tmp_path / f"upstream-{len(added)}.raw"
        image.write_bytes(os.urandom(1024**2) + b"\0" * 2 * 1024**2)
        ticket = ticket_dict(image, 3 * 1024**2)
        server.add_ticket(ticket)
        added.append((server, ticket["uuid"]))
        return server.image_url(ticket["uuid"]), image

    yield make
    for server, ticket_id in added:
        server.delete_ticket(ticket_id)


def _copy_through(proxy, ticket_id, image, tmp_path):
    """A download and an upload through the proxy ticket reach ``image``."""
    url = proxy.image_url(ticket_id)
    got = tmp_path / "through-proxy.raw"
    run = client_cmd(proxy, "download", "--quiet", url, got)
    assert run.returncode == 0, run.stderr
    assert got.read_bytes() == image.read_bytes()
    new = tmp_path / "new.raw"
    new.write_bytes(os.urandom(3 * 1024**2))
    run = client_cmd(proxy, "upload", "--quiet", new, url)
    assert run.returncode == 0, run.stderr
    assert image.read_bytes() == new.read_bytes()


@pytest.mark.parametrize("upstream_kind", ["ovirt-imageio", "diskferry"])
def test_proxy_ticket_learns_the_size(df, daemons, upstream_ticket, tmp_path,
                                      upstream_kind):
    up = daemons.get(upstream_kind, local_socket=None)
    up_url, image = upstream_ticket(up)
    ticket_id = add(df, "--ops", "read,write", "--cafile", up.ca_file, up_url)
    try:
        info = df.get_ticket(ticket_id)
        assert info["url"] == up_url
        assert info["size"] == 3 * 1024**2
        _copy_through(df, ticket_id, image, tmp_path)
    finally:
        df.delete_ticket(ticket_id)


def test_proxy_ticket_over_http(df, daemons, upstream_ticket, tmp_path):
    up = daemons.get("diskferry", tls=False, local_socket=None)
    up_url, image = upstream_ticket(up)
    assert up_url.startswith("http://")
    ticket_id = add(df, "--ops", "read,write", up_url)
    try:
        info = df.get_ticket(ticket_id)
        assert (info["url"], info["size"]) == (up_url, 3 * 1024**2)
        _copy_through(df, ticket_id, image, tmp_path)
    finally:
        df.delete_ticket(ticket_id)


def test_proxy_ticket_errors(df, daemons, upstream_ticket):
    up = daemons.get("ovirt-imageio", local_socket=None)
    up_url, _ = upstream_ticket(up)
    # The upstream's certificate is not signed by a system CA.
    run = ticket_cmd(df, "add", up_url)
    assert run.returncode == 1
    assert f"cannot read the size of {up_url}" in run.stderr
    assert "give --cafile" in run.stderr and "Traceback" not in run.stderr
    # No such upstream ticket.
    gone = up_url.rsplit("/", 1)[0] + "/no-such-ticket"
    run = ticket_cmd(df, "add", "--cafile", up.ca_file, gone)
    assert run.returncode == 1
    assert "403" in run.stderr and "give --size" in run.stderr
    assert "--cafile" not in run.stderr
    # With --size, the URL is kept and nothing is asked of the upstream.
    ticket_id = add(df, "--size", "1M", up_url)
    try:
        info = df.get_ticket(ticket_id)
        assert (info["url"], info["size"]) == (up_url, 1024**2)
    finally:
        df.delete_ticket(ticket_id)


def test_proxy_ticket_url_shortened_in_the_table(df, daemons, upstream_ticket):
    up = daemons.get("ovirt-imageio", local_socket=None)
    up_url, _ = upstream_ticket(up)
    upstream_id = up_url.rsplit("/", 1)[1]
    ticket_id = add(df, "--size", "1M", up_url)
    try:
        run = ticket_cmd(df, "list")
        assert upstream_id not in run.stdout
        assert up_url.replace(upstream_id, upstream_id[:4] + "...") in \
            run.stdout
        assert up_url in ticket_cmd(df, "list", "--full-ids").stdout
    finally:
        df.delete_ticket(ticket_id)


# --- every documented NBD URL form, as a ticket --------------------------------


@pytest.fixture(scope="module")
def nbd_exports(tmp_path_factory):
    """One raw image served by qemu-nbd three ways: unnamed and named
    ("disk") on UNIX sockets, and named on TCP."""
    import nbd_servers

    folder = tmp_path_factory.mktemp("nbd forms")
    image = folder / "disk.raw"
    image.write_bytes(os.urandom(1024**2))
    unnamed = nbd_servers.start_export("qemu-nbd", image,
                                       sock=str(folder / "unnamed.sock"))
    named = nbd_servers.start_export("qemu-nbd", image,
                                     sock=str(folder / "named.sock"),
                                     extra=["--export-name=disk"])
    port = nbd_servers.free_port()
    tcp = nbd_servers.start_process(
        nbd_servers.qemu_nbd_argv(image, ("127.0.0.1", port),
                                  extra=["--export-name=disk"]),
        ("127.0.0.1", port), folder / "tcp.log")
    try:
        yield {"image": image, "unnamed": unnamed.sock, "named": named.sock,
               "port": port}
    finally:
        for export in (unnamed, named, tcp):
            export.stop()


NBD_FORMS = {
    "legacy unix": "nbd:unix:{unnamed}",
    "legacy unix named": "nbd:unix:{named}:exportname=disk",
    "tcp uri": "nbd://127.0.0.1:{port}/disk",
    "unix uri": "nbd+unix:///disk?socket={named}",
    "unix uri unnamed": "nbd+unix:///?socket={unnamed}",
}


@pytest.mark.parametrize("how", ["cli", "raw PUT"])
@pytest.mark.parametrize("form", NBD_FORMS)
def test_every_documented_nbd_form_is_a_ticket(df, nbd_exports, tmp_path,
                                               form, how):
    url = NBD_FORMS[form].format(**nbd_exports)
    image = nbd_exports["image"]
    if how == "cli":
        ticket_id = add(df, "--ops", "read,write", url)
    else:
        ticket = ticket_dict(image, 1024**2, url=url)
        ticket_id = ticket["uuid"]
        status, _, body = df.control("PUT", f"/tickets/{ticket_id}", ticket)
        assert status == 200, body
    try:
        info = df.get_ticket(ticket_id)
        assert (info["url"], info["size"]) == (url, 1024**2)
        got = tmp_path / "got.raw"
        run = client_cmd(df, "download", "--quiet", df.image_url(ticket_id),
                         got)
        assert run.returncode == 0, run.stderr
        assert got.read_bytes() == image.read_bytes()
        new = tmp_path / "new.raw"
        new.write_bytes(os.urandom(1024**2))
        run = client_cmd(df, "upload", "--quiet", new, df.image_url(ticket_id))
        assert run.returncode == 0, run.stderr
        assert image.read_bytes() == new.read_bytes()
    finally:
        df.delete_ticket(ticket_id)


@pytest.mark.parametrize("url", ["nbd+unix:///disk?socket=relative.sock",
                                 "nbd+unix:///disk", "nbd+unix://h/?socket=/s"])
def test_bad_nbd_unix_uris_are_refused(df, url):
    run = ticket_cmd(df, "add", "--size", "1M", url)
    assert run.returncode == 1
    assert "400" in run.stderr and "'url'" in run.stderr
    assert "Traceback" not in run.stderr


# --- what a refused IMAGE says ----------------------------------------------


def test_missing_file_is_named_whatever_the_size(df, tmp_path):
    missing = tmp_path / "nowhere" / "file.raw"
    run = ticket_cmd(df, "add", missing)
    assert run.returncode == 1
    assert run.stderr.strip() == (f"diskferry ticket: cannot read the size "
                                  f"of {missing}: No such file or directory")
    run = ticket_cmd(df, "add", "--size", "1G", missing)
    assert run.returncode == 1
    assert f"{missing}: No such file or directory" in run.stderr
    assert "give --size" not in run.stderr
    assert df.control("GET", "/tickets/")[2].find(b"nowhere") == -1


@pytest.mark.parametrize("url", ["nbd:foo", "nbd:unix:", "nbd://",
                                 "nbd+unix:///x"])
def test_malformed_nbd_url_says_why_not_size(df, url):
    run = ticket_cmd(df, "add", url)
    assert run.returncode == 1
    assert run.stderr.startswith(f"diskferry ticket: {url} is not an NBD "
                                 f"URL: ")
    assert "give --size" not in run.stderr
    assert len(run.stderr.splitlines()) == 1


# --- certificates: --cafile checked at the door, named when it would help ----


@pytest.mark.parametrize("command", [["info"], ["map"],
                                     ["download", "{tmp}/out.raw"]])
def test_unverified_certificate_hints_at_cafile(df, tmp_path, command):
    image = tmp_path / "disk.raw"
    image.write_bytes(b"c" * 4096)
    ticket_id = add(df, image)
    try:
        argv = [arg.replace("{tmp}", str(tmp_path)) for arg in command]
        run = subprocess.run(
            [sys.executable, "-m", "diskferry", argv[0],
             df.image_url(ticket_id), *argv[1:]],
            capture_output=True, text=True, timeout=120)
    finally:
        df.delete_ticket(ticket_id)
    assert run.returncode == 1
    assert "CERTIFICATE_VERIFY_FAILED" in run.stderr
    assert "give --cafile with the CA that signed the server's " \
           "certificate" in run.stderr
    assert "Traceback" not in run.stderr


@pytest.mark.parametrize("command", [["info", "https://h/images/x"],
                                     ["ticket", "add", "x.raw"]])
def test_cafile_that_is_no_pem_is_named(tmp_path, command):
    not_pem = tmp_path / "not-a-ca.txt"
    not_pem.write_text("hello\n")
    run = subprocess.run(
        [sys.executable, "-m", "diskferry", *command, "--cafile",
         str(not_pem)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert f"argument --cafile: {not_pem}: not a PEM file of CA " \
           f"certificates" in run.stderr
    assert "Traceback" not in run.stderr
