"""``diskferry ticket list --watch`` against a real daemon and real
transfers: in a real terminal (tmux), where a person reads it, and into
a pipe, where a script logs it."""

import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

#: A rate that is not zero: "512 B/s", "1.00 MiB/s".
MOVING = re.compile(r"\b(?!0 B/s)\d+(\.\d+)? (B|KiB|MiB|GiB|TiB)/s\b")


@pytest.fixture(scope="module")
def df(tmp_path_factory):
    """A daemon of this module's own: no other test's tickets in its
    tables."""
    import servers

    with servers.start_server("diskferry",
                              tmp_path_factory.mktemp("watched")) as server:
        yield server


@pytest.fixture
def read_ticket(df, tmp_path):
    """A read ticket on a 1 MiB file, and a function downloading it."""
    image = tmp_path / "watched.raw"
    image.write_bytes(b"w" * 1024**2)
    ticket_id = f"watch-{tmp_path.name}"
    df.add_ticket({"uuid": ticket_id, "size": 1024**2, "ops": ["read"],
                   "url": f"file://{image}", "timeout": 300})

    def download():
        con = df.remote_connection()
        try:
            con.request("GET", f"/images/{ticket_id}")
            res = con.getresponse()
            assert res.status == 200
            assert len(res.read()) == 1024**2
        finally:
            con.close()

    yield ticket_id, download
    df.delete_ticket(ticket_id)


def watch_argv(df, *args):
    return [sys.executable, "-m", "diskferry", "ticket", "--socket",
            df.control_socket, "list", "--full-ids", "--watch", *args]


def wait_for(predicate, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout}s: {predicate.__doc__}")


# --- in a terminal ------------------------------------------------------------


class Tmux:
    """A tmux server of the test's own, with one window running a command."""

    def __init__(self, socket, command, width, height):
        self.socket = str(socket)
        self.tmux("new-session", "-d", "-s", "watch", "-x", str(width),
                  "-y", str(height), command)

    def tmux(self, *args):
        return subprocess.run(["tmux", "-S", self.socket, *args], check=True,
                              capture_output=True, text=True,
                              timeout=10).stdout

    def screen(self):
        return self.tmux("capture-pane", "-p", "-t", "watch")

    def close(self):
        subprocess.run(["tmux", "-S", self.socket, "kill-server"],
                       capture_output=True, timeout=10)


@pytest.mark.skipif(not shutil.which("tmux"), reason="needs tmux")
def test_watch_redraws_in_place_in_a_terminal(df, read_ticket, tmp_path):
    ticket_id, download = read_ticket
    argv = " ".join(watch_argv(df, "0.5"))
    tmux = Tmux(tmp_path / "tmux.sock",
                f"{argv}; echo exit=$?; sleep 60", width=250, height=20)
    try:
        def row():
            """the ticket's row is drawn"""
            screen = tmux.screen()
            return next((line for line in screen.splitlines()
                         if line.startswith(ticket_id)), None)

        assert " 0 B " in wait_for(row)
        download()

        def moving():
            """the download shows as a rate"""
            line = row()
            return line if line and MOVING.search(line) else None

        assert "1.00 MiB" in wait_for(moving)

        def still():
            """the rate is back to zero"""
            line = row()
            return line if line and re.search(r"1\.00 MiB +0 B/s", line) \
                else None

        wait_for(still)
        screen = tmux.screen().splitlines()
        # Redrawn in place: one title, at the top, with the time.
        assert screen[0].startswith("Every 0.5s: diskferry ticket list")
        assert re.search(r"\d\d:\d\d:\d\d$", screen[0])
        assert sum("diskferry ticket list" in line for line in screen) == 1
        assert screen[2].split()[:6] == ["ID", "URL", "OPS", "SIZE",
                                         "TRANSFERRED", "RATE"]

        # In a narrower window, lines are cut, not wrapped: the title
        # stays at the top and each row on one line.
        tmux.tmux("resize-window", "-t", "watch", "-x", "60")

        def cut():
            """the table is cut to 60 columns"""
            screen = tmux.screen().splitlines()
            return screen if screen[2].split() == ["ID", "URL"] else None

        screen = wait_for(cut)
        assert screen[0].startswith("Every 0.5s: diskferry ticket list")
        row = next(line for line in screen if line.startswith(ticket_id))
        assert row.startswith(ticket_id + "  file://") and len(row) == 60
        assert all(len(line) <= 60 for line in screen)

        tmux.tmux("send-keys", "-t", "watch", "C-c")
        wait_for(lambda: "exit=" in tmux.screen())
        screen = tmux.screen()
        assert "exit=130" in screen
        assert "Traceback" not in screen and "KeyboardInterrupt" not in screen
        assert ticket_id in screen, "the last table stays"
    finally:
        tmux.close()


# --- into a pipe --------------------------------------------------------------


def test_watch_into_a_pipe_logs_a_table_per_poll(df, read_ticket):
    ticket_id, download = read_ticket
    proc = subprocess.Popen(watch_argv(df, "0.3"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        frames = []

        def next_frame():
            lines = []
            while line := proc.stdout.readline():
                if line == "\n":
                    return lines
                lines.append(line.rstrip("\n"))
            raise AssertionError(f"watch ended: {proc.stderr.read()}")

        frames.append(next_frame())
        download()
        for _ in range(20):
            frames.append(next_frame())
            if any(ticket_id in line and MOVING.search(line)
                   for line in frames[-1]):
                break
        else:
            raise AssertionError(f"no rate shown: {frames}")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130
    assert err == ""
    assert "\x1b" not in out + "".join(map("".join, frames))
    for frame in frames:
        assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", frame[0])
        assert frame[1].split()[4:6] == ["TRANSFERRED", "RATE"]
    first = next(line for line in frames[0] if line.startswith(ticket_id))
    assert re.search(r" 0 B +- ", first), "no rate before a second poll"
    last = next(line for line in frames[-1] if line.startswith(ticket_id))
    assert "1.00 MiB" in last


def test_watch_into_a_closed_pipe_ends_quietly(df, read_ticket):
    proc = subprocess.run(
        " ".join(watch_argv(df, "0.1")) + " | head -n 1; "
        "exit ${PIPESTATUS[0]}",
        shell=True, executable="/bin/bash", capture_output=True, text=True,
        timeout=60)
    assert proc.returncode == 128 + signal.SIGPIPE
    assert proc.stderr == ""


def test_watch_ends_when_the_daemon_goes_away(tmp_path):
    import servers

    with servers.start_server("diskferry", tmp_path) as server:
        proc = subprocess.Popen(watch_argv(server, "0.2"),
                                stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        assert proc.stdout.readline()
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 1
    assert "cannot reach the control socket" in err
    assert "Traceback" not in err
