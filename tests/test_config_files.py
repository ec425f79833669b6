"""Where the daemon keeps its state, conf.d drop-ins and --show-config.

The folder defaults are a pure function of the environment and the
effective user (``places``), checked in a table; the commands are run
as real processes with the environment systemd would give them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib

import pytest

from diskferry.daemon import config, places, tomlwrite

HOME = "/home/me"


@pytest.mark.parametrize("env,euid,state,run", [
    # A user: XDG folders, or their fallbacks.
    ({"HOME": HOME, "XDG_STATE_HOME": "/x/state",
      "XDG_RUNTIME_DIR": "/run/user/1000"}, 1000,
     "/x/state/diskferry", "/run/user/1000/diskferry"),
    ({"HOME": HOME, "XDG_RUNTIME_DIR": "/run/user/1000"}, 1000,
     f"{HOME}/.local/state/diskferry", "/run/user/1000/diskferry"),
    ({"HOME": HOME}, 1000,
     f"{HOME}/.local/state/diskferry", f"{HOME}/.local/state/diskferry/run"),
    # Root, outside and under systemd (StateDirectory=, RuntimeDirectory=).
    ({"HOME": "/root", "XDG_RUNTIME_DIR": "/run/user/0"}, 0,
     "/var/lib/diskferry", "/run/diskferry"),
    ({"STATE_DIRECTORY": "/var/lib/diskferry:/var/lib/other",
      "RUNTIME_DIRECTORY": "/run/diskferry"}, 0,
     "/var/lib/diskferry", "/run/diskferry"),
    ({"STATE_DIRECTORY": "/srv/df", "RUNTIME_DIRECTORY": "/run/df"}, 1000,
     "/srv/df", "/run/df"),
    # An explicit state folder keeps the run files inside it.
    ({"DISKFERRY_STATE_DIR": "/tmp/df", "RUNTIME_DIRECTORY": "/run/df",
      "XDG_RUNTIME_DIR": "/run/user/1000"}, 1000, "/tmp/df", "/tmp/df/run"),
    ({"DISKFERRY_STATE_DIR": "/tmp/df"}, 0, "/tmp/df", "/tmp/df/run"),
])
def test_default_folders(env, euid, state, run):
    where = places.state_dir("", env, euid)
    assert where.path == state
    assert places.run_dir("", where, env, euid).path == run


def test_configured_folders_win(tmp_path):
    env = {"DISKFERRY_STATE_DIR": "/tmp/df", "RUNTIME_DIRECTORY": "/run/df"}
    state = places.state_dir(str(tmp_path / "s"), env, 0)
    assert (state.path, state.origin) == (str(tmp_path / "s"),
                                          "[daemon] state_dir")
    assert places.run_dir("", state, env, 0).path == str(tmp_path / "s/run")
    run = places.run_dir(str(tmp_path / "r"), state, env, 0)
    assert (run.path, run.origin) == (str(tmp_path / "r"), "[daemon] run_dir")


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("DISKFERRY_STATE_DIR", "STATE_DIRECTORY",
                        "RUNTIME_DIRECTORY", "XDG_STATE_HOME",
                        "XDG_RUNTIME_DIR", "NOTIFY_SOCKET")}
    env.update(extra)
    return env


def diskferry(*args, cwd=None, env=None):
    return subprocess.run([sys.executable, "-m", "diskferry", *args],
                          capture_output=True, text=True, timeout=60,
                          cwd=cwd, env=env or clean_env())


def shown(*args, **kwargs):
    run = diskferry("serve", "--show-config", *args, **kwargs)
    assert run.returncode == 0, run.stderr
    return tomllib.loads(run.stdout)


def test_show_config_under_systemd_is_the_same_from_any_folder(tmp_path):
    env = clean_env(STATE_DIRECTORY=str(tmp_path / "state"),
                    RUNTIME_DIRECTORY=str(tmp_path / "run"))
    seen = []
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        seen.append(shown(cwd=tmp_path / folder, env=env))
    assert seen[0] == seen[1]
    assert seen[0]["daemon"]["state_dir"] == str(tmp_path / "state")
    assert seen[0]["daemon"]["run_dir"] == str(tmp_path / "run")
    assert seen[0]["control"]["socket"] == str(tmp_path / "run/control.sock")


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_conf_d_merged_in_name_order(tmp_path):
    main = write(tmp_path / "daemon.toml",
                 '[remote]\nhost = "::"\nport = 1\n[logging]\nlevel = "DEBUG"\n')
    conf_d = tmp_path / "etc" / "conf.d"
    # Written in an order other than their names'.
    write(conf_d / "90-host.toml", "[remote]\nport = 9000\n")
    write(conf_d / "10-vendor.toml",
          "[remote]\nport = 1000\n[backend_file]\ndirect = true\n")
    write(conf_d / "50-site.toml", "[remote]\nport = 5000\n[tls]\nenable = false\n")
    write(conf_d / "99-notes.conf", "[remote]\nport = 'not read'\n")
    write(conf_d / ".95-hidden.toml", "[remote]\nport = 'not read'\n")
    c = config.load(str(main), str(tmp_path / "etc"))
    assert c.remote.port == 9000
    assert c.remote.host == "::"
    assert c.backend_file.direct is True
    assert c.tls.enable is False
    assert c.logging.level == "DEBUG"
    assert config.files(str(main), str(tmp_path / "etc")) == [
        str(main), *(str(conf_d / n) for n in
                     ("10-vendor.toml", "50-site.toml", "90-host.toml"))]


def test_conf_d_errors_name_the_file(tmp_path):
    bad = write(tmp_path / "conf.d" / "20-bad.toml", "[remote]\nport = 'x'\n")
    with pytest.raises(config.ConfigError, match=f"{bad}: .*port must be int"):
        config.load(None, str(tmp_path))
    with pytest.raises(config.ConfigError, match="not a directory"):
        config.load(None, str(tmp_path / "missing"))
    # A folder without drop-ins yet is the defaults.
    (tmp_path / "empty").mkdir()
    assert config.load(None, str(tmp_path / "empty")) == config.Config()


def test_show_config_fed_back_is_the_same_configuration(tmp_path):
    write(tmp_path / "etc" / "conf.d" / "50-site.toml", """
[daemon]
inactivity_timeout = 120
[remote]
host = "::"
port = 12345
[local]
socket = "@diskferry/test \\"quoted\\" \\u007f"
[tls]
cert_file = "/etc/pki/diskferry/server.pem"
key_file = "/etc/pki/diskferry/server.key"
[logging]
level = "warning"
""")
    env = clean_env(DISKFERRY_STATE_DIR=str(tmp_path / "state"))
    first = diskferry("serve", "--show-config", "--conf-dir",
                      str(tmp_path / "etc"), env=env)
    assert first.returncode == 0, first.stderr
    printed = write(tmp_path / "printed.toml", first.stdout)
    # Fed back from elsewhere, without the environment it was made in.
    (tmp_path / "other").mkdir()
    second = diskferry("serve", "--show-config", "--config", str(printed),
                       cwd=tmp_path / "other")
    assert second.returncode == 0, second.stderr
    assert second.stdout == first.stdout
    loaded = config.load(str(printed))
    assert loaded.remote.port == 12345
    assert loaded.local.socket == '@diskferry/test "quoted" \x7f'
    assert loaded.daemon.state_dir == str(tmp_path / "state")
    assert loaded.run_dir == str(tmp_path / "state" / "run")
    assert config.effective(loaded) == loaded


def test_toml_strings_read_back():
    values = {"s": 'a"b\\c\nd\te\x00f\x7fg\u2028h\U0001f600',
              "n": -3, "t": True, "f": False, "e": "", "r": 0.25,
              "big": 1e20, "inf": float("inf")}
    assert tomllib.loads(tomlwrite.dumps({"x": values})) == {"x": values}
    with pytest.raises(TypeError):
        tomlwrite.dumps({"x": {"list": [1]}})


def test_bad_log_level_is_named(tmp_path):
    path = write(tmp_path / "d.toml", '[logging]\nlevel = "verbose"\n')
    with pytest.raises(config.ConfigError,
                       match=r"\[logging\] level must be one of DEBUG"):
        config.load(str(path))
    run = diskferry("serve", "--config", str(path))
    assert run.returncode == 2
    assert "Traceback" not in run.stderr
    assert "[logging] level" in run.stderr
