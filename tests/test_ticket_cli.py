"""``diskferry ticket`` against a running daemon's control socket."""

import json
import subprocess
import sys

import pytest


def ticket_cmd(server, *args):
    return subprocess.run(
        [sys.executable, "-m", "diskferry", "ticket", "--socket",
         server.control_socket, *args],
        capture_output=True, text=True, timeout=60)


@pytest.fixture
def df(daemons):
    return daemons.get("diskferry")


def test_add_show_extend_delete(df, tmp_path):
    image = tmp_path / "disk.raw"
    image.write_bytes(b"x" * 8192)
    run = ticket_cmd(df, "add", "--ops", "read,write", "--sparse",
                     "--transfer-id", "t-cli", "--timeout", "100", str(image))
    assert run.returncode == 0, run.stderr
    ticket_id = run.stdout.strip()

    info = json.loads(ticket_cmd(df, "show", "--json", ticket_id).stdout)
    assert info["size"] == 8192
    assert info["url"] == f"file://{image}"
    assert info["ops"] == ["read", "write"]
    assert info["sparse"] is True
    assert info["transfer_id"] == "t-cli"

    before = info["expires"]
    assert ticket_cmd(df, "extend", ticket_id, "1000").returncode == 0
    assert df.get_ticket(ticket_id)["expires"] >= before + 890

    assert ticket_cmd(df, "del", ticket_id).returncode == 0
    run = ticket_cmd(df, "show", ticket_id)
    assert run.returncode == 1
    assert "404" in run.stderr and ticket_id in run.stderr


def test_add_with_id_and_delete_all(df, tmp_path):
    image = tmp_path / "disk.raw"
    image.write_bytes(b"")
    for name in ("cli-a", "cli-b"):
        run = ticket_cmd(df, "add", "--id", name, "--size", "4096",
                         str(image))
        assert run.returncode == 0, run.stderr
        assert run.stdout.strip() == name
    assert df.get_ticket("cli-a")["size"] == 4096
    assert ticket_cmd(df, "del", "--all").returncode == 0
    for name in ("cli-a", "cli-b"):
        assert ticket_cmd(df, "show", name).returncode == 1


def test_errors_are_one_line(df, tmp_path):
    image = tmp_path / "disk.raw"
    image.write_bytes(b"")
    run = ticket_cmd(df, "add", "--ops", "read,delete", str(image))
    assert run.returncode == 2
    assert "argument --ops" in run.stderr and "Traceback" not in run.stderr
    run = ticket_cmd(df, "add", str(tmp_path / "missing.raw"))
    assert run.returncode == 1
    assert "cannot read the size" in run.stderr
    assert "Traceback" not in run.stderr
    run = ticket_cmd(df, "del")
    assert run.returncode == 1
    assert "give a ticket id or --all" in run.stderr
    run = subprocess.run(
        [sys.executable, "-m", "diskferry", "ticket", "--socket",
         str(tmp_path / "none.sock"), "show", "x"],
        capture_output=True, text=True, timeout=60)
    assert run.returncode == 1
    assert "cannot reach the control socket" in run.stderr


def test_add_nbd_export_takes_its_size(df, tmp_path):
    import nbd_servers

    image = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image),
                    "3M"], check=True)
    with nbd_servers.start_export("qemu-nbd", image, fmt="qcow2") as export:
        run = ticket_cmd(df, "add", "--ops", "read", "--dirty", export.url)
        assert run.returncode == 0, run.stderr
        info = df.get_ticket(run.stdout.strip())
    assert info["url"] == export.url
    assert info["size"] == 3 * 1024**2
    assert info["dirty"] is True


def test_add_nbd_errors(df, tmp_path):
    run = ticket_cmd(df, "add", f"nbd:unix:{tmp_path}/none.sock")
    assert run.returncode == 1
    assert "cannot read the size" in run.stderr and "give --size" in run.stderr
    assert "Traceback" not in run.stderr
    run = ticket_cmd(df, "add", "--size", "4096", "nbd:unix:relative.sock")
    assert run.returncode == 1
    assert "'url'" in run.stderr and "not absolute" in run.stderr


# --- sizes, listing, options anywhere, arguments checked at the door ---------


def test_size_with_suffix_and_list(df, tmp_path):
    image = tmp_path / "disk.raw"
    image.write_bytes(b"")
    ids = []
    for size, expected in (("1G", 1024**3), ("512k", 512 * 1024),
                           ("2MiB", 2 * 1024**2), ("4096", 4096)):
        run = ticket_cmd(df, "add", "--size", size, str(image))
        assert run.returncode == 0, run.stderr
        ids.append(run.stdout.strip())
        assert df.get_ticket(ids[-1])["size"] == expected
    run = ticket_cmd(df, "list", "--json")
    assert run.returncode == 0, run.stderr
    listed = {t["uuid"]: t for t in json.loads(run.stdout)}
    assert set(ids) <= set(listed)
    assert listed[ids[0]]["size"] == 1024**3
    for ticket_id in ids:
        df.delete_ticket(ticket_id)
    remaining = json.loads(ticket_cmd(df, "list", "--json").stdout)
    assert not set(ids) & {t["uuid"] for t in remaining}


def test_connection_options_after_the_action(df, tmp_path):
    """``ticket add --config F`` and ``--socket`` after the action are the
    same as before it."""
    conf = tmp_path / "daemon.toml"
    conf.write_text(f'[control]\nsocket = "{df.control_socket}"\n')
    image = tmp_path / "disk.raw"
    image.write_bytes(b"x" * 4096)
    for argv in (["ticket", "add", "--config", str(conf), str(image)],
                 ["ticket", "--config", str(conf), "add", str(image)],
                 ["ticket", "add", str(image), "--socket",
                  df.control_socket]):
        run = subprocess.run([sys.executable, "-m", "diskferry", *argv],
                             capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, (argv, run.stderr)
        assert df.get_ticket(run.stdout.strip())["size"] == 4096
        df.delete_ticket(run.stdout.strip())


def test_add_help_describes_and_shows_examples():
    run = subprocess.run([sys.executable, "-m", "diskferry", "ticket", "add",
                          "--help"], capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0
    assert "Authorize access to an image" in run.stdout
    assert "examples:" in run.stdout
    assert "--size 10G" in run.stdout


@pytest.mark.parametrize("argv,option", [
    (["ticket", "add", "--size", "1Q", "x"], "--size"),
    (["ticket", "add", "--size", "-1", "x"], "--size"),
    (["ticket", "add", "--timeout", "-5", "x"], "--timeout"),
    (["ticket", "add", "--timeout", "soon", "x"], "--timeout"),
    (["ticket", "add", "--inactivity-timeout", "-1", "x"],
     "--inactivity-timeout"),
    (["ticket", "extend", "some-id", "-1"], "timeout"),
    (["ticket", "add", "--ops", "read,delete", "x"], "--ops"),
    (["ticket", "add", "--ops", ",", "x"], "--ops"),
    (["ticket", "add", "--config", "/nonexistent/daemon.toml", "x"],
     "/nonexistent/daemon.toml"),
    (["ticket", "list", "--conf-dir", "/nonexistent"], "/nonexistent"),
    (["ticket", "list", "--watch", "0.01"], "--watch"),
    (["ticket", "list", "--watch", "soon"], "--watch"),
    (["ticket", "list", "--watch", "--json"], "--json"),
    (["serve", "--config", "/nonexistent/daemon.toml"],
     "/nonexistent/daemon.toml"),
    (["serve", "--conf-dir", "/nonexistent"], "/nonexistent"),
    (["serve", "--bogus"], "--bogus"),
])
def test_bad_arguments_exit_2_naming_the_option(argv, option):
    run = subprocess.run([sys.executable, "-m", "diskferry", *argv],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2, run.stderr
    assert option in run.stderr
    assert "Traceback" not in run.stderr


# --- the control socket found the same way from any folder -------------------


def test_found_from_any_folder_under_systemd(tmp_path):
    """A daemon started as systemd starts it (StateDirectory=,
    RuntimeDirectory=, Type=notify) in one folder; ``diskferry ticket``
    in another finds its control socket with no option at all."""
    import socket

    from test_config_files import clean_env

    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    notify.settimeout(30)
    env = clean_env(STATE_DIRECTORY=str(tmp_path / "state"),
                    RUNTIME_DIRECTORY=str(tmp_path / "run"),
                    NOTIFY_SOCKET=str(tmp_path / "notify.sock"))
    conf = tmp_path / "daemon.toml"
    conf.write_text("[remote]\nport = 0\n[tls]\nenable = false\n"
                    "[local]\nenable = false\n")
    for folder in ("serve-here", "ticket-here"):
        (tmp_path / folder).mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "diskferry", "serve", "--config", str(conf)],
        cwd=tmp_path / "serve-here", env=env, stderr=subprocess.PIPE,
        text=True)
    try:
        assert notify.recv(100) == b"READY=1"
        assert (tmp_path / "run" / "control.sock").exists()
        image = tmp_path / "disk.raw"
        image.write_bytes(b"")

        def ticket(*args, env=env):
            return subprocess.run(
                [sys.executable, "-m", "diskferry", "ticket", *args],
                cwd=tmp_path / "ticket-here", env=env, capture_output=True,
                text=True, timeout=60)

        run = ticket("add", "--id", "anywhere", "--size", "1M", str(image))
        assert run.returncode == 0, run.stderr
        assert [t["uuid"] for t in json.loads(ticket("list", "--json").stdout)] == \
            ["anywhere"]
        # Elsewhere, the message says where it looked and why there.
        other = dict(env, RUNTIME_DIRECTORY=str(tmp_path / "nothing"))
        run = ticket("list", env=other)
        assert run.returncode == 1
        assert f"{tmp_path}/nothing/control.sock" in run.stderr
        assert "$RUNTIME_DIRECTORY" in run.stderr
        assert "Traceback" not in run.stderr
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
        notify.close()
    assert proc.returncode == 0
    assert not (tmp_path / "run" / "control.sock").exists()
