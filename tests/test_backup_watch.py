"""The watch that ends a backup when its domain's QEMU ends: a pidfd of a
real process, and the NBD server's pid as the kernel names it."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest

from diskferry.daemon.backup.watch import ProcessWatch
from diskferry.qemuprocess import server_pid


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def sleeper() -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", "import time; "
                             "time.sleep(60)"])


def test_the_end_of_the_process_is_told_once():
    before = open_fds()
    proc = sleeper()
    ended = threading.Event()
    calls = []

    def on_exit():
        calls.append(threading.current_thread().name)
        ended.set()

    watch = ProcessWatch(proc.pid, on_exit, "watch-test")
    proc.kill()
    proc.wait()
    assert ended.wait(5)
    watch.close()
    assert calls == ["watch-test"]
    assert open_fds() == before


def test_closed_first_tells_nothing_and_leaves_nothing():
    before = open_fds()
    proc = sleeper()
    try:
        calls = []
        watch = ProcessWatch(proc.pid, lambda: calls.append(1), "watch-test")
        watch.close()
        watch.close()
    finally:
        proc.kill()
        proc.wait()
    assert calls == []
    assert "watch-test" not in {t.name for t in threading.enumerate()}
    assert open_fds() == before


def test_closing_from_the_callback_does_not_wait_for_itself():
    proc = sleeper()
    done = threading.Event()
    watch: list[ProcessWatch] = []

    def on_exit():
        watch[0].close()
        done.set()

    watch.append(ProcessWatch(proc.pid, on_exit, "watch-test"))
    proc.kill()
    proc.wait()
    assert done.wait(5)
    watch[0].close()


def test_a_process_that_ended_is_refused():
    proc = sleeper()
    proc.kill()
    proc.wait()
    with pytest.raises(ProcessLookupError):
        ProcessWatch(proc.pid, lambda: None, "watch-test")


def test_server_pid_is_the_listening_process(tmp_path):
    socket_path = str(tmp_path / "nbd.sock")
    image = tmp_path / "disk.raw"
    image.write_bytes(b"\0" * 65536)
    proc = subprocess.Popen(["qemu-nbd", "-r", "-f", "raw", "-k",
                             socket_path, str(image)],
                            stderr=subprocess.PIPE)
    try:
        pid = None
        for _ in range(500):
            pid = server_pid(socket_path, 1.0)
            if pid is not None:
                break
            threading.Event().wait(0.01)
        assert pid == proc.pid
    finally:
        proc.terminate()
        _, stderr = proc.communicate()
    # The handshake ended as the protocol says: nothing logged.
    assert stderr == b""
    assert server_pid(socket_path, 1.0) is None
