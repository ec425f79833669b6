"""The daemon's log handler: one write per record, whole lines, no lock.

Many threads log at once, as a loaded daemon's connections do (one
access-log line per request); every line must come out whole, on a pipe
(a service manager's journal) and on a file.
"""

from __future__ import annotations

import logging
import os
import threading

import pytest

from diskferry.logformat import LOG_FORMAT, EscapingFormatter, LineWriter

THREADS = 16
RECORDS = 300


def _logger(fd: int, name: str) -> logging.Logger:
    handler = LineWriter(fd)
    handler.setFormatter(EscapingFormatter(LOG_FORMAT))
    logger = logging.getLogger(f"test.logformat.{name}")
    logger.propagate = False
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    return logger


def _log_from_threads(logger: logging.Logger) -> None:
    def run(n: int) -> None:
        for i in range(RECORDS):
            logger.info("thread %d record %d %s", n, i, "x" * (n * 13))

    threads = [threading.Thread(target=run, args=(n,))
               for n in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _assert_whole(text: str) -> None:
    lines = text.splitlines()
    assert len(lines) == THREADS * RECORDS
    seen = set()
    for line in lines:
        message = line.split(": ", 1)[1]
        _, n, _, i, tail = message.split(" ")
        assert tail == "x" * (int(n) * 13), line
        seen.add((int(n), int(i)))
    assert len(seen) == THREADS * RECORDS


def test_threads_logging_to_a_file_write_whole_lines(tmp_path):
    path = tmp_path / "log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        _log_from_threads(_logger(fd, "file"))
    finally:
        os.close(fd)
    _assert_whole(path.read_text())


def test_threads_logging_to_a_pipe_write_whole_lines():
    r, w = os.pipe()
    chunks: list[bytes] = []

    def drain() -> None:
        while data := os.read(r, 65536):
            chunks.append(data)

    reader = threading.Thread(target=drain)
    reader.start()
    try:
        _log_from_threads(_logger(w, "pipe"))
    finally:
        os.close(w)
        reader.join()
        os.close(r)
    _assert_whole(b"".join(chunks).decode())


def test_a_record_is_escaped_to_one_line(tmp_path):
    path = tmp_path / "log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        _logger(fd, "escape").info("forged\nline %s", "\r\x1b[2J")
    finally:
        os.close(fd)
    text = path.read_text()
    assert text.count("\n") == 1
    assert text.endswith("forged\\x0aline \\x0d\\x1b[2J\n")


def test_a_failed_write_does_not_raise(tmp_path, monkeypatch, capsys):
    r, w = os.pipe()
    os.close(r)  # writes now fail with EPIPE
    monkeypatch.setattr(logging, "raiseExceptions", True)
    try:
        _logger(w, "broken").info("lost")
    finally:
        os.close(w)
    assert "Logging error" in capsys.readouterr().err


@pytest.mark.parametrize("level", ["DEBUG", "WARNING"])
def test_records_below_the_level_are_not_written(tmp_path, level):
    path = tmp_path / "log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        logger = _logger(fd, f"level{level}")
        logger.setLevel(level)
        logger.debug("debug")
        logger.warning("warning")
    finally:
        os.close(fd)
    expected = ["debug", "warning"] if level == "DEBUG" else ["warning"]
    assert [line.rsplit(": ", 1)[1]
            for line in path.read_text().splitlines()] == expected
