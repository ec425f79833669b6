"""The Session API on real servers, and on a server that predates OPTIONS."""

import http.server
import re
import threading

import pytest

from diskferry import client
from diskferry.client import Extent
from diskferry.client.extents import ranges

from .helpers import KINDS, MiB, empty_image, make_image


@pytest.fixture(params=[(k, u) for k in KINDS for u in ("auto", "never")],
                ids=[f"{k}-{'unix' if u == 'auto' else 'tls'}"
                     for k in KINDS for u in ("auto", "never")])
def writable(request, daemons, make_ticket, tmp_path):
    kind, unix = request.param
    srv = daemons.get(kind)
    path = empty_image(tmp_path / "img.raw", 4 * MiB)
    ticket = make_ticket(srv, path, 4 * MiB)
    sess = client.open(srv.image_url(ticket["uuid"]), "w", cafile=srv.ca_file,
                       unix=unix)
    yield sess, path, kind
    sess.close()


def test_options(writable):
    sess, _, _ = writable
    assert {"extents", "zero", "flush", "checksum"} <= sess.features
    assert sess.max_readers >= 1
    assert sess.max_writers >= 1
    assert sess.options.unix_socket


def test_write_read_zero_flush(writable, tmp_path):
    sess, path, _ = writable
    assert sess.size() == 4 * MiB
    sess.write(b"a" * 8192, 4096)
    buf = bytearray(3 * 4096)
    assert sess.readinto(buf, 0) == len(buf)
    assert buf == bytes(4096) + b"a" * 8192
    sess.zero(8192, 4096)
    sess.flush()
    assert sess.read(0, 12288) == bytes(4096) + b"a" * 4096 + bytes(4096)

    src = make_image(tmp_path / "src.raw", MiB, "full")
    with open(tmp_path / "src.raw", "rb") as f:
        sess.write_from(f, 2 * MiB, 65536, src_offset=4096)
    sess.flush()
    assert path.read_bytes()[2 * MiB:2 * MiB + 65536] == src[4096:4096 + 65536]


def test_extents_and_checksum(writable):
    sess, path, kind = writable
    sess.write(b"x" * MiB, MiB)
    sess.flush()
    exts = sess.extents()
    assert exts[0].start == 0
    assert exts[-1].end == 4 * MiB
    if kind == "diskferry":
        assert Extent(MiB, MiB, False) in exts
    answer = sess.checksum()
    assert answer["algorithm"] == "blake2b"
    assert answer["block_size"] == 4 * MiB
    from diskferry import checksum
    assert checksum.compute_file(path)["checksum"] == answer["checksum"]


@pytest.mark.parametrize("kind", KINDS)
def test_walk_extents_in_windows(daemons, make_ticket, tmp_path, kind):
    srv = daemons.get(kind)
    make_image(tmp_path / "img.raw", 16 * MiB, "sparse")
    ticket = make_ticket(srv, tmp_path / "img.raw", 16 * MiB, ops=["read"])
    with client.open(srv.image_url(ticket["uuid"]), cafile=srv.ca_file) as s:
        whole = s.extents()
        walked = list(s.walk_extents(window=3 * MiB))
    assert walked[0].start == 0
    assert walked[-1].end == 16 * MiB
    assert all(a.end == b.start for a, b in zip(walked, walked[1:], strict=False))
    for zero in (True, False):
        assert ranges(walked, zero) == ranges(whole, zero)


def test_read_only_session_refuses_writes(daemons, make_ticket, tmp_path):
    srv = daemons.get("diskferry")
    ticket = make_ticket(srv, empty_image(tmp_path / "img.raw", MiB), MiB,
                         ops=["read"])
    with client.open(srv.image_url(ticket["uuid"]), cafile=srv.ca_file) as s:
        assert "zero" not in s.features
        with pytest.raises(client.UnsupportedOperation):
            s.write(b"x", 0)


def test_bad_arguments():
    with pytest.raises(ValueError):
        client.open("https://localhost/images/x", mode="a")
    with pytest.raises(ValueError):
        client.open("https://localhost/images/x", unix="sometimes")
    with pytest.raises(client.ClientError, match="not a transfer URL"):
        client.open("https://localhost/tickets/x")


# --- a server from before OPTIONS -------------------------------------------


class OldImageHandler(http.server.BaseHTTPRequestHandler):
    """GET with a Range and PUT with a Content-Range; nothing else."""

    protocol_version = "HTTP/1.1"
    image = bytearray()

    def log_message(self, *args):
        pass

    def do_OPTIONS(self):
        self.send_response(405)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self):
        first, last = map(int, re.match(r"bytes=(\d+)-(\d+)",
                                        self.headers["Range"]).groups())
        last = min(last, len(self.image) - 1)
        body = bytes(self.image[first:last + 1])
        self.send_response(206)
        self.send_header("Content-Range",
                         f"bytes {first}-{last}/{len(self.image)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_PUT(self):
        length = int(self.headers["Content-Length"])
        match = re.match(r"bytes (\d+)-", self.headers.get("Content-Range", ""))
        offset = int(match[1]) if match else 0
        self.image[offset:offset + length] = self.rfile.read(length)
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture
def old_server():
    OldImageHandler.image = bytearray(2 * MiB)
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), OldImageHandler)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/images/old"
    srv.shutdown()
    srv.server_close()


def test_old_server_gets_only_get_and_put(old_server, tmp_path):
    content = make_image(tmp_path / "src.raw", 2 * MiB, "sparse")
    result = client.upload(tmp_path / "src.raw", old_server,
                           request_size=MiB // 2)
    assert result.transport == "tcp"
    assert result.transport_reason == "the server offers no UNIX socket"
    assert OldImageHandler.image == content
    client.download(old_server, tmp_path / "dst.raw")
    assert (tmp_path / "dst.raw").read_bytes() == content
    with client.open(old_server) as sess:
        assert not sess.options.known
        with pytest.raises(client.UnsupportedOperation, match="too old"):
            sess.extents()


def test_get_body_in_chunks_and_a_writer_failing_midway(daemons, make_ticket,
                                                        tmp_path):
    """A GET body is handed out in order, a chunk at a time; a writer that
    fails leaves the response unread, so the connection is closed: its
    own error goes on as it is, a reader gone from a pipe (EPIPE) as the
    connection's failure, and the next request reconnects."""
    import errno

    from diskferry.client.connection import STREAM_CHUNK

    srv = daemons.get("diskferry")
    content = make_image(tmp_path / "img.raw", 4 * MiB, "full")
    ticket = make_ticket(srv, tmp_path / "img.raw", 4 * MiB, ops=["read"])
    with client.open(srv.image_url(ticket["uuid"]), "r",
                     cafile=srv.ca_file) as sess:
        con = sess.connection()
        got = bytearray()
        with con.get(MiB, 3 * MiB) as body:
            for view, pos in body:
                assert pos == MiB + len(got)
                assert len(view) <= STREAM_CHUNK
                got += view
        assert got == content[MiB:4 * MiB]

        for error, raised in ((OSError(errno.ENOSPC, "full"), OSError),
                              (BrokenPipeError(errno.EPIPE, "gone"),
                               client.ConnectionFailed)):
            with pytest.raises(raised) as e:
                with con.get(0, 4 * MiB) as body:
                    for _view, _pos in body:
                        raise error
            assert (e.value is error) == (raised is OSError)
            # The unread body went with the connection: a new one answers.
            buf = bytearray(MiB)
            con.readinto(buf, 0)
            assert buf == content[:MiB]
        con.close()
