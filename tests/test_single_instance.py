"""One daemon per run directory; a second daemon never breaks the first.

Real processes: daemon A is started by tests/servers.py, daemon B by
``python -m diskferry serve`` with a configuration written here, and A is
checked afterwards through its control socket, its local socket and its
remote port.
"""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import servers
from diskferry.daemon.http.listener import remove_stale_socket
from diskferry.daemon.instancelock import LOCK_NAME, InstanceLock, InstanceLocked


@pytest.fixture
def daemon_a(tmp_path):
    """A diskferry daemon with socket files (no TLS: a faster start) and a
    ticket added before any second daemon tries."""
    workdir = tmp_path / "a"
    srv = servers.start_server("diskferry", workdir, tls=False,
                               local_socket="path")
    image = servers.make_sparse_file(tmp_path / "a.raw", 1 << 20,
                                     {0: b"diskferry A\n"})
    ticket = servers.ticket_dict(image, 1 << 20, ops=("read",))
    srv.add_ticket(ticket)
    srv.ticket = ticket
    srv.files = _inodes(srv)
    yield srv
    srv.stop()


def _inodes(srv):
    return {p: os.stat(p).st_ino for p in (srv.control_socket,
                                           srv.local_socket)}


def _config_path(srv) -> str:
    return str(Path(srv.workdir) / "diskferry.toml")


def serve(config: str, cwd) -> subprocess.CompletedProcess:
    """Run a second daemon that is expected to refuse to start."""
    return subprocess.run(
        [sys.executable, "-m", "diskferry", "serve", "--config", config],
        cwd=cwd, capture_output=True, text=True, timeout=20)


def write_config(workdir: Path, *, port=0, local=None, control=None) -> str:
    """A configuration for daemon B with its own state directory, and
    socket paths of its own unless given."""
    workdir.mkdir(parents=True, exist_ok=True)
    servers._diskferry_conf(
        workdir, None, False, "127.0.0.1", port,
        local or str(workdir / "local.sock"),
        control or str(workdir / "control.sock"),
        daemon_options={"state_dir": str(workdir / "state")})
    return str(workdir / "diskferry.toml")


def assert_refused(run, *words):
    assert run.returncode != 0, run.stderr
    assert "Traceback" not in run.stderr, run.stderr
    lines = [line for line in run.stderr.splitlines() if "cannot start" in line]
    assert len(lines) == 1, run.stderr
    for word in words:
        assert word in lines[0], run.stderr


def assert_serves(srv):
    """A answers on every service, with its ticket and its socket files."""
    assert srv.alive(), srv.log_text()
    assert _inodes(srv) == srv.files
    ticket = srv.get_ticket(srv.ticket["uuid"])
    assert ticket["uuid"] == srv.ticket["uuid"]
    for con in (srv.remote_connection(timeout=10),
                srv.local_connection(timeout=10)):
        try:
            con.request("GET", f"/images/{srv.ticket['uuid']}",
                        headers={"Range": "bytes=0-11"})
            res = con.getresponse()
            assert (res.status, res.read()) == (206, b"diskferry A\n")
        finally:
            con.close()


# --- two daemons -----------------------------------------------------------


def test_same_folder_and_config_is_refused(daemon_a):
    run = serve(_config_path(daemon_a), daemon_a.workdir)
    assert_refused(run, "another daemon", f"pid {daemon_a.pid}", LOCK_NAME)
    assert_serves(daemon_a)


@pytest.mark.parametrize("service", ["control", "local"])
def test_other_run_dir_same_socket_is_refused(daemon_a, tmp_path, service):
    path = (daemon_a.control_socket if service == "control"
            else daemon_a.local_socket)
    config = write_config(tmp_path / "b", **{service: path})
    run = serve(config, tmp_path / "b")
    assert_refused(run, f"{service} service: {path} is in use")
    assert_serves(daemon_a)
    # B bound its other sockets and removed them again; A's are intact.
    other = "local" if service == "control" else "control"
    assert not (tmp_path / "b" / f"{other}.sock").exists()


def test_same_remote_port_is_refused(daemon_a, tmp_path):
    config = write_config(tmp_path / "b", port=daemon_a.port)
    run = serve(config, tmp_path / "b")
    assert_refused(
        run, f"remote service: 127.0.0.1:{daemon_a.port} is in use "
             f"(another daemon?)")
    assert_serves(daemon_a)
    assert not (tmp_path / "b" / "control.sock").exists()


@pytest.mark.parametrize("service", ["remote", "local", "control"])
def test_busy_address_is_refused_before_a_ca_is_made(daemon_a, tmp_path,
                                                     service):
    """B has TLS on and no certificate: a start would make a CA in its
    state folder; a busy address must stop it before that."""
    b = tmp_path / "b"
    b.mkdir()
    busy = {"remote": daemon_a.port, "local": daemon_a.local_socket,
            "control": daemon_a.control_socket}[service]
    port = busy if service == "remote" else 0
    local = busy if service == "local" else str(b / "local.sock")
    control = busy if service == "control" else str(b / "control.sock")
    config = b / "diskferry.toml"
    config.write_text(
        f'[remote]\nhost = "127.0.0.1"\nport = {port}\n'
        f'[tls]\nenable = true\n'
        f'[local]\nenable = true\nsocket = "{local}"\n'
        f'[control]\ntransport = "unix"\nsocket = "{control}"\n'
        f'[daemon]\nstate_dir = "{b / "state"}"\n')
    run = serve(str(config), b)
    address = f"127.0.0.1:{busy}" if service == "remote" else busy
    assert_refused(run, f"{service} service: {address} is in use")
    # Nothing made but the run folder its lock was in: no CA, no key.
    state = b / "state"
    assert [str(p.relative_to(state)) for p in state.rglob("*")] == ["run"]
    assert not (b / "local.sock").exists()
    assert not (b / "control.sock").exists()
    assert_serves(daemon_a)


def test_separate_daemons_both_serve(daemon_a, tmp_path):
    with servers.start_server("diskferry", tmp_path / "b", tls=False,
                              local_socket="path") as b:
        image = servers.make_sparse_file(tmp_path / "b.raw", 4096)
        ticket = servers.ticket_dict(image, 4096)
        b.add_ticket(ticket)
        assert b.get_ticket(ticket["uuid"])["size"] == 4096
        assert_serves(daemon_a)
        with pytest.raises(servers.TicketError) as e:
            daemon_a.get_ticket(ticket["uuid"])
        assert e.value.status == 404
    assert_serves(daemon_a)


# --- what a daemon leaves behind ---------------------------------------------


def test_killed_daemon_leaves_stale_sockets_cleaned_by_next_start(tmp_path):
    workdir = tmp_path / "a"
    first = servers.start_server("diskferry", workdir, tls=False,
                                 local_socket="path")
    first.kill()
    assert os.path.exists(first.control_socket)
    assert os.path.exists(first.local_socket)
    with servers.start_server("diskferry", workdir, tls=False,
                              local_socket="path") as second:
        assert second.control_socket == first.control_socket
        status, _, _ = second.control("GET", "/tickets/nosuch")
        assert status == 404
        con = second.local_connection(timeout=10)
        con.request("OPTIONS", "/images/*")
        assert con.getresponse().status == 200
        con.close()
    assert not os.path.exists(second.control_socket)
    assert not os.path.exists(second.local_socket)
    assert not (workdir / ".diskferry" / "run" / LOCK_NAME).exists()


def test_stop_leaves_a_socket_file_it_did_not_bind(tmp_path):
    srv = servers.start_server("diskferry", tmp_path / "a", tls=False,
                               local_socket="path")
    try:
        # Someone else now owns the path of A's local socket.
        os.unlink(srv.local_socket)
        other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        other.bind(srv.local_socket)
        other.listen()
    finally:
        assert srv.stop() == 0, srv.log_text()
    try:
        assert os.path.exists(srv.local_socket)
        assert not os.path.exists(srv.control_socket)
        assert "not removing" in srv.log_text()
    finally:
        other.close()


# --- the pieces, in process --------------------------------------------------


def test_lock_is_exclusive_and_names_its_holder(tmp_path):
    with InstanceLock(str(tmp_path)) as first:
        assert (tmp_path / LOCK_NAME).read_text() == f"{os.getpid()}\n"
        with pytest.raises(InstanceLocked) as e:
            InstanceLock(str(tmp_path)).acquire()
        assert e.value.pid == os.getpid()
        assert first.held
    assert not (tmp_path / LOCK_NAME).exists()
    with InstanceLock(str(tmp_path)):
        pass


def test_lock_left_by_a_dead_holder_is_taken(tmp_path):
    (tmp_path / LOCK_NAME).write_text("999999999\n")
    with InstanceLock(str(tmp_path)):
        assert (tmp_path / LOCK_NAME).read_text() == f"{os.getpid()}\n"


def test_stale_socket_file_is_removed(tmp_path):
    path = str(tmp_path / "s.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(path)
    assert os.path.exists(path)
    remove_stale_socket(path)
    assert not os.path.exists(path)
    remove_stale_socket(path)  # nothing there: nothing to do


def test_live_socket_file_is_kept(tmp_path):
    path = str(tmp_path / "s.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(path)
        s.listen()
        with pytest.raises(OSError) as e:
            remove_stale_socket(path)
        assert e.value.errno == errno.EADDRINUSE
        assert os.path.exists(path)


def test_other_file_at_socket_path_is_kept(tmp_path):
    path = tmp_path / "s.sock"
    path.write_text("not a socket")
    with pytest.raises(FileExistsError):
        remove_stale_socket(str(path))
    assert path.read_text() == "not a socket"
