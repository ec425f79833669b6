"""The download command in a real terminal (tmux): the progress bar,
the verifying phase and the summary, in binary units, as a user sees
them on screen."""

import re
import shlex
import shutil
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None,
                                reason="tmux missing: scripts/setup installs it")


class Terminal:
    """A private tmux server (its own socket) with one 120x40 window."""

    def __init__(self, tmp_path):
        self._socket = str(tmp_path / "tmux.sock")

    def tmux(self, *args):
        return subprocess.run(["tmux", "-S", self._socket, *args],
                              capture_output=True, text=True, check=True,
                              timeout=30)

    def start(self, command):
        # The shell stays after the command, so that its screen can be
        # read once it is done.
        self.tmux("new-session", "-d", "-x", "120", "-y", "40", "-s", "cli",
                  f"{command}; echo EXIT=$?; sleep 600")

    def screen(self):
        return self.tmux("capture-pane", "-p", "-J", "-t", "cli").stdout

    def wait_for(self, pattern, timeout=120):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            screen = self.screen()
            if re.search(pattern, screen):
                return screen
            time.sleep(0.1)
        raise AssertionError(f"{pattern!r} never on screen:\n{self.screen()}")

    def close(self):
        subprocess.run(["tmux", "-S", self._socket, "kill-server"],
                       capture_output=True, timeout=30)


@pytest.fixture
def terminal(tmp_path):
    term = Terminal(tmp_path)
    yield term
    term.close()


def test_download_with_verify_on_a_terminal(slow_ticket, terminal, tmp_path):
    srv, url = slow_ticket
    command = " ".join(shlex.quote(str(a)) for a in (
        sys.executable, "-m", "diskferry", "download", "--verify",
        "--workers", "1", "--request-size", "64K", "--cafile", srv.ca_file,
        url, tmp_path / "out.raw"))
    terminal.start(command)
    # Midway: the bar is drawn, in binary units, before the copy ends.
    midway = terminal.wait_for(r"download +\d+% \|#*")
    assert not re.search(r"\d[kMG]B/s", midway), midway
    screen = terminal.wait_for(r"EXIT=\d+")
    assert "EXIT=0" in screen, screen
    assert re.search(r"download 100% \|#+\| 8.00 MiB/8.00 MiB "
                     r"[\d.]+ [KMG]iB/s", screen), screen
    assert re.search(r"verifying 100% \|#+\| 8.00 MiB/8.00 MiB "
                     r"[\d.]+ [KMG]iB/s", screen), screen
    assert re.search(r"downloaded 8.00 MiB \(8.00 MiB data\) in [\d.]+ s "
                     r"\(copy [\d.]+ s at [\d.]+ [KMG]iB/s, verify [\d.]+ s\)"
                     r" via unix \(1 connection\), checksum verified", screen)
    # Decimal units would contradict the summary's.
    assert not re.search(r"\d ?[kMG]B\b", screen), screen
    assert (tmp_path / "out.raw").read_bytes() == \
        (tmp_path / "slow.raw").read_bytes()
