"""What the client commands say when the server is not an image server."""

import socket
import subprocess
import sys
import time

import pytest


@pytest.fixture
def web_server(tmp_path):
    """Python's http.server: answers errors with an HTML page."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind",
         "127.0.0.1"], cwd=tmp_path, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "http.server did not start"
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.parametrize("command", [["info"], ["map"],
                                     ["download", "{tmp}/out.raw"]])
def test_an_html_answer_is_not_printed(web_server, tmp_path, command):
    argv = [arg.replace("{tmp}", str(tmp_path)) for arg in command]
    run = subprocess.run(
        [sys.executable, "-m", "diskferry", argv[0],
         f"{web_server}/images/x", *argv[1:], "--unix", "never"],
        capture_output=True, text=True, timeout=120)
    assert run.returncode == 1
    assert len(run.stderr.splitlines()) == 1, run.stderr
    assert "501" in run.stderr and "(an HTML page)" in run.stderr
    assert "<" not in run.stderr


def test_one_line():
    from diskferry.cli import common

    assert common.one_line("a\n  b\tc") == "a b c"
    assert common.one_line("404 Not Found: <html><body>x</body></html>") == \
        "404 Not Found: (an HTML page)"
    long = common.one_line("x" * 2000)
    assert len(long) == common.MAX_MESSAGE and long.endswith("...")
