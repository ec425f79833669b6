"""The shipped systemd unit: valid for systemd, and what the daemon expects.

``systemd-analyze verify`` loads the unit and its drop-in the way
systemd would and reports unknown keys, bad values and an ExecStart that
is not executable. The unit is checked as shipped, in a root folder laid
out as docs/configuration.md installs it: the unit and its drop-in in
/etc/systemd/system, diskferry in a venv at /opt/diskferry, linked as
/usr/local/bin/diskferry (the command ExecStart names), and the host's
own system units, which the unit depends on.
"""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from test_config_files import clean_env

ROOT = Path(__file__).resolve().parents[1]
UNIT_DIR = ROOT / "contrib" / "systemd"
UNIT = UNIT_DIR / "diskferry.service"
INSTALLED = "/usr/local/bin/diskferry"
VENV = "/opt/diskferry"
VENV_DISKFERRY = Path(sys.executable).parent / "diskferry"
SYSTEM_UNITS = Path("/usr/lib/systemd/system")
INSTALLED_UNIT = "/etc/systemd/system/diskferry.service"


def installed_root(tmp_path: Path, command: bool = True) -> Path:
    """A root folder where the unit is installed as documented; with
    ``command``, diskferry too."""
    root = tmp_path / "root"
    units = root / INSTALLED_UNIT.lstrip("/")
    units.parent.mkdir(parents=True)
    shutil.copy(UNIT, units)
    shutil.copytree(UNIT_DIR / "diskferry.service.d",
                    units.parent / "diskferry.service.d")
    shutil.copytree(SYSTEM_UNITS, root / str(SYSTEM_UNITS).lstrip("/"),
                    symlinks=True)
    if command:
        venv_bin = root / VENV.lstrip("/") / "bin"
        venv_bin.mkdir(parents=True)
        shutil.copy(VENV_DISKFERRY, venv_bin / "diskferry")
        link = root / INSTALLED.lstrip("/")
        link.parent.mkdir(parents=True)
        os.symlink(f"{VENV}/bin/diskferry", link)
    return root


def verify(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-analyze", "verify", f"--root={root}", INSTALLED_UNIT],
        capture_output=True, text=True, timeout=60)


def service_section() -> dict[str, str]:
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(UNIT)
    return dict(parser["Service"])


def test_systemd_analyze_verify(tmp_path):
    run = verify(installed_root(tmp_path))
    assert run.returncode == 0, run.stderr
    # Warnings (an unknown key, a bad value) do not fail verify: none of
    # them may name the unit or its drop-in.
    assert "diskferry.service" not in run.stderr, run.stderr


def test_verify_catches_a_bad_key(tmp_path):
    """The check above can fail: a mistake in the drop-in is reported."""
    root = installed_root(tmp_path)
    drop_in = root / INSTALLED_UNIT.lstrip("/")
    with open(f"{drop_in}.d/images.conf", "a") as f:
        f.write("ReadWritePath=/srv/typo\n")
    assert "Unknown key 'ReadWritePath'" in verify(root).stderr


def test_verify_needs_the_documented_install(tmp_path):
    """Without the command the install makes, the unit as shipped fails:
    the check looks where ExecStart points."""
    run = verify(installed_root(tmp_path, command=False))
    assert run.returncode != 0
    assert f"Command {INSTALLED} is not executable" in run.stderr


def test_configuration_doc_makes_the_command():
    """The install that docs/configuration.md gives makes the command the
    unit names."""
    doc = (ROOT / "docs" / "configuration.md").read_text()
    assert f"python3 -m venv {VENV}" in doc
    assert f"{VENV}/bin/pip install " in doc
    assert f"ln -s {VENV}/bin/diskferry {INSTALLED}" in doc


def test_unit_settings():
    service = service_section()
    assert service["Type"] == "notify"
    assert service["Restart"] == "on-failure"
    assert service["StateDirectory"] == "diskferry"
    assert service["RuntimeDirectory"] == "diskferry"
    assert service["ProtectSystem"] == "strict"
    assert service["ExecStart"] == f"{INSTALLED} serve --conf-dir /etc/diskferry"
    assert "ReadWritePaths" in (UNIT_DIR / "diskferry.service.d" /
                                "images.conf").read_text()


def test_daemon_under_the_unit_uses_systemds_folders(tmp_path):
    """With the environment systemd gives (StateDirectory=diskferry,
    RuntimeDirectory=diskferry) the daemon writes nowhere else: the only
    folders ProtectSystem=strict leaves writable."""
    (tmp_path / "etc").mkdir()
    run = subprocess.run(
        [str(VENV_DISKFERRY), "serve", "--show-config", "--conf-dir",
         str(tmp_path / "etc")],
        capture_output=True, text=True, timeout=60,
        env=clean_env(STATE_DIRECTORY="/var/lib/diskferry",
                      RUNTIME_DIRECTORY="/run/diskferry"))
    assert run.returncode == 0, run.stderr
    shown = tomllib.loads(run.stdout)
    assert shown["daemon"]["state_dir"] == "/var/lib/diskferry"
    assert shown["daemon"]["run_dir"] == "/run/diskferry"
    assert shown["control"]["socket"] == "/run/diskferry/control.sock"
