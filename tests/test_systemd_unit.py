"""The shipped systemd unit: valid for systemd, and what the daemon expects.

``systemd-analyze verify`` loads the unit and its drop-in the way
systemd would and reports unknown keys, bad values and an ExecStart that
is not executable. The unit names the installed command
(/usr/local/bin/diskferry); the copy checked here names this venv's.
"""

from __future__ import annotations

import configparser
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
VENV_DISKFERRY = Path(sys.executable).parent / "diskferry"


def unit_copy(tmp_path: Path) -> Path:
    copy = tmp_path / "diskferry.service"
    shutil.copytree(UNIT_DIR / "diskferry.service.d",
                    tmp_path / "diskferry.service.d")
    text = UNIT.read_text()
    assert f"ExecStart={INSTALLED} " in text
    copy.write_text(text.replace(INSTALLED, str(VENV_DISKFERRY)))
    return copy


def service_section() -> dict[str, str]:
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(UNIT)
    return dict(parser["Service"])


def test_systemd_analyze_verify(tmp_path):
    copy = unit_copy(tmp_path)
    run = subprocess.run(["systemd-analyze", "verify", str(copy)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    # Warnings (an unknown key, a bad value) do not fail verify: none of
    # them may name the unit or its drop-in.
    assert "diskferry.service" not in run.stderr, run.stderr


def test_verify_catches_a_bad_key(tmp_path):
    """The check above can fail: a mistake in the drop-in is reported."""
    copy = unit_copy(tmp_path)
    with open(tmp_path / "diskferry.service.d" / "images.conf", "a") as f:
        f.write("ReadWritePath=/srv/typo\n")
    run = subprocess.run(["systemd-analyze", "verify", str(copy)],
                         capture_output=True, text=True, timeout=60)
    assert "Unknown key 'ReadWritePath'" in run.stderr


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
