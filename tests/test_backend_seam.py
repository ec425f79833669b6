"""The backend seam: which capabilities each backend claims, how the data
path chooses by them, and how backend errors become answers."""

from types import SimpleNamespace

import pytest

from diskferry.daemon.backends.base import (
    ForwardsChecksum,
    SplicesPipes,
    ZeroCopyFile,
    offers_splicing,
    offers_zero_copy_file,
)
from diskferry.daemon.backends.file import FileBackend
from diskferry.daemon.backends.http import HttpBackend
from diskferry.daemon.backends.memory import MemoryBackend
from diskferry.daemon.backends.nbd import NbdBackend
from diskferry.daemon.handlers import datapath
from diskferry.errors import (
    BackendError,
    BadRequest,
    FeatureNotOffered,
    NotAvailable,
    ServerError,
    UpstreamAnswered,
    UpstreamFailed,
    request_error,
)

MiB = 1024**2


@pytest.mark.parametrize("backend, claims", [
    (FileBackend, {ZeroCopyFile}),
    (NbdBackend, {SplicesPipes}),
    (HttpBackend, {ForwardsChecksum}),
    (MemoryBackend, set()),
])
def test_capabilities_claimed(backend, claims):
    for capability in (ZeroCopyFile, SplicesPipes, ForwardsChecksum):
        assert issubclass(backend, capability) == (capability in claims)


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "img"
    path.write_bytes(b"x" * MiB)
    return str(path)


def test_capability_checks_agree_with_isinstance(image):
    backends = [FileBackend(image), MemoryBackend(10)]
    try:
        for b in backends:
            assert offers_zero_copy_file(b) == isinstance(b, ZeroCopyFile)
            assert offers_splicing(b) == isinstance(b, SplicesPipes)
    finally:
        for b in backends:
            b.close()


class Splicing(MemoryBackend):
    """A memory image that says it splices (the choice only asks)."""

    def __init__(self, size, can):
        super().__init__(size)
        self._can = can

    def can_splice(self):
        return self._can

    def pipe_piece(self, capacity):
        return capacity

    def read_to_pipes(self, pipes, offset, length, piece, reclaim):
        raise AssertionError("not called")

    def write_from_pipe(self, pipe, offset, length):
        raise AssertionError("not called")


PLAIN = SimpleNamespace(zero_copy=True)
TLS = SimpleNamespace(zero_copy=False)


@pytest.mark.parametrize("direct", [False, True])
def test_file_descriptor_on_plain_sockets_only(image, direct):
    b = FileBackend(image, direct=direct)
    try:
        assert datapath._file_descriptor(TLS, b) is None
        # O_DIRECT keeps the page cache out: no sendfile, no splice.
        expected = None if b.direct else b.fileno()
        assert datapath._file_descriptor(PLAIN, b) == expected
    finally:
        b.close()
    assert datapath._file_descriptor(PLAIN, MemoryBackend(1)) is None


@pytest.mark.parametrize("conn, can, length, spliced", [
    (PLAIN, True, datapath.MIN_SPLICED, True),
    (PLAIN, True, datapath.MIN_SPLICED - 1, False),
    (PLAIN, False, datapath.MIN_SPLICED, False),
    (TLS, True, datapath.MIN_SPLICED, False),
])
def test_splicing_chosen(conn, can, length, spliced):
    b = Splicing(2 * MiB, can)
    assert (datapath._splicer(conn, b, length) is b) == spliced
    assert datapath._splicer(conn, MemoryBackend(2 * MiB), length) is None


@pytest.mark.parametrize("error, status, message, close", [
    (FeatureNotOffered("no zero here"), 400, "no zero here", False),
    (UpstreamAnswered(403, "go away"), 403, "go away", False),
    (UpstreamAnswered(416, "out"), 416, "out", False),
    (UpstreamAnswered(507, "full"), 507, "full", False),
    # Not a status this daemon may send: the proxy's own.
    (UpstreamAnswered(302, "moved"), 502, "moved", False),
    (UpstreamAnswered(599, "odd"), 502, "odd", False),
    (UpstreamFailed("the server behind failed"), 500,
     "the server behind failed", True),
    # Anything else: nothing of the storage's details goes out.
    (BackendError("EIO at /secret/path"), 500, "Internal server error", True),
    (NotAvailable("/secret/path has no dirty bitmap"), 500,
     "Internal server error", True),
])
def test_backend_errors_as_answers(error, status, message, close):
    answer = request_error(error)
    assert (answer.status, answer.message, answer.close_connection) == (
        status, message, close)


def test_feature_not_offered_is_a_bad_request():
    assert isinstance(request_error(FeatureNotOffered("x")), BadRequest)
    assert isinstance(request_error(UpstreamFailed("x")), ServerError)

