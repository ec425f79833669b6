"""Configuration, TLS settings and the daemon's start and stop."""

import os
import signal
import socket
import ssl
import subprocess
import sys
import time

import pytest

from diskferry.daemon import config
from diskferry.daemon.service import tls_context


def write(tmp_path, text):
    path = tmp_path / "daemon.toml"
    path.write_text(text)
    return str(path)


def test_defaults_without_file(monkeypatch, tmp_path):
    monkeypatch.setenv("DISKFERRY_STATE_DIR", str(tmp_path))
    c = config.load(None)
    assert c.remote.port == 54322
    assert c.tls.enable
    assert c.local_socket == "\0/org/ovirt/imageio"
    assert c.control_socket == str(tmp_path / "run" / "control.sock")
    assert c.control.remove_timeout == 60
    assert c.backend_file.direct is False


def test_load_overrides_and_abstract_socket(tmp_path):
    c = config.load(write(tmp_path, """
[remote]
host = "::"
port = 0
[local]
socket = "@test/sock"
[control]
transport = "tcp"
[backend_file]
direct = true
"""))
    assert (c.remote.host, c.remote.port) == ("::", 0)
    assert c.local_socket == "\0test/sock"
    assert c.control.transport == "tcp"
    assert c.backend_file.direct is True


@pytest.mark.parametrize("text,words", [
    ("[nope]\nx = 1\n", "unknown section [nope]"),
    ("[remote]\nhots = 'x'\n", "unknown option 'hots'"),
    ("[remote]\nport = '54322'\n", "port must be int"),
    ("[tls]\nenable = 1\n", "enable must be bool"),
    ("[daemon]\nmax_connections = true\n", "max_connections must be int"),
    ("[control]\ntransport = 'udp'\n", "transport"),
    ("[backend_file]\nbuffer_size = 1000\n", "multiple of 4096"),
    ("[remote\n", "Invalid TOML"),
])
def test_invalid_config_is_named(tmp_path, text, words):
    with pytest.raises(config.ConfigError, match=words.replace("[", r"\[")):
        config.load(write(tmp_path, text))


def test_missing_config_file(tmp_path):
    with pytest.raises(config.ConfigError, match="Cannot read"):
        config.load(str(tmp_path / "missing.toml"))


def test_tls_minimum_version(pki):
    ctx = tls_context(pki.cert_file, pki.key_file)
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2


def test_serve_bad_config_exits_2(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "diskferry", "serve", "--config",
         write(tmp_path, "[remote]\nport = 'x'\n")],
        capture_output=True, text=True, timeout=30)
    assert run.returncode == 2
    assert "port must be int" in run.stderr


def test_sigterm_stops_cleanly_and_removes_sockets(tmp_path):
    local = tmp_path / "local.sock"
    control = tmp_path / "control.sock"
    path = write(tmp_path, f"""
[daemon]
state_dir = "{tmp_path}"
[remote]
port = 0
[tls]
enable = false
[local]
socket = "{local}"
[control]
socket = "{control}"
""")
    proc = subprocess.Popen(
        [sys.executable, "-m", "diskferry", "serve", "--config", path],
        stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    while not (local.exists() and control.exists()):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    assert oct(os.stat(control).st_mode & 0o777) == oct(0o660)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert "stopped" in err
    assert not local.exists() and not control.exists()


def test_port_in_use_fails_start(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        run = subprocess.run(
            [sys.executable, "-m", "diskferry", "serve", "--config",
             write(tmp_path, f"[daemon]\nstate_dir = '{tmp_path}'\n"
                             f"[remote]\nport = {port}\n[tls]\nenable = false\n"
                             f"[local]\nenable = false\n")],
            capture_output=True, text=True, timeout=30)
    assert run.returncode == 1
    assert f"cannot start: remote service: 127.0.0.1:{port} is in use " \
        "(another daemon?)" in run.stderr
    assert "Traceback" not in run.stderr
    assert not (tmp_path / "run" / "control.sock").exists()


def test_missing_cert_file_is_named(tmp_path, pki):
    missing = tmp_path / "missing.pem"
    run = subprocess.run(
        [sys.executable, "-m", "diskferry", "serve", "--config",
         write(tmp_path, f"[daemon]\nstate_dir = '{tmp_path}'\n"
                         f"[remote]\nport = 0\n"
                         f"[tls]\ncert_file = '{missing}'\n"
                         f"key_file = '{pki.key_file}'\n"
                         f"[local]\nenable = false\n")],
        capture_output=True, text=True, timeout=30)
    assert run.returncode == 1
    assert f"cannot start: TLS: cannot load certificate {missing}" \
        in run.stderr
    assert "No such file" in run.stderr
    assert not (tmp_path / "run" / "control.sock").exists()
