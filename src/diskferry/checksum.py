"""Block-based image checksum, the same digest ovirt-imageio 2.x computes.

Why block based: a whole-image hash must read every byte, but most disk
images are mostly zeros. Hashing fixed-size blocks and then hashing the
list of block digests lets a zero block be accounted for with a digest
computed once, so holes and zero ranges cost nothing to checksum.

The scheme (ovirt-imageio calls it "blkhash")::

    image:   | block 0 | block 1 | ... | block n-1 | last (shorter) |
    digest:  H( H(block 0) || H(block 1) || ... || H(last) )

- Blocks are ``block_size`` bytes, aligned to the start of the image; the
  last one is shorter when the size is not a multiple (an empty image
  has no blocks, so its checksum is ``H()`` of nothing).
- ``H`` is the named ``hashlib`` algorithm, the same for blocks and for
  the outer hash; blake2b and blake2s use a 32-byte digest, every other
  algorithm its natural size. The outer hash is returned as hex.
- The digest depends only on the content: a hole, a zero extent and
  written zeros all give ``H(zeros of the block's length)``. Extents only
  decide which blocks need not be read; a block read from storage that
  turns out all zero takes the same shortcut after a C-speed compare.

Checksums of the same image agree only with the same algorithm and
block size, which is why the result names both.
"""

import functools
import hashlib
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

from .errors import BackendError, BadRequest
from .extent import Extent, file_extents

MiB = 1024 * 1024

DEFAULT_ALGORITHM = "blake2b"
#: Large blocks amortize per-block work; 4 MiB is ovirt-imageio's default.
DEFAULT_BLOCK_SIZE = 4 * MiB
#: Digest size of blake2b and blake2s: large enough, and valid for both.
BLAKE2_DIGEST_SIZE = 32

#: Each request allocates one block; these bounds keep a client from
#: asking for tiny blocks (slow) or huge ones (memory). Same as
#: ovirt-imageio, so the same requests are accepted.
MIN_BLOCK_SIZE = DEFAULT_BLOCK_SIZE // 4
MAX_BLOCK_SIZE = DEFAULT_BLOCK_SIZE * 4

#: Longest block_size string converted: a valid one has 8 digits; a
#: longer one is refused before int(), which is slow on long strings.
MAX_BLOCK_SIZE_DIGITS = 20

#: Blocks must be whole storage sectors, so reads can use direct I/O.
BLOCK_SIZE_ALIGNMENT = 4096

#: Bytes of image whose extents are asked for at once, so that a huge
#: fragmented image never needs its whole extent list in memory. The
#: image is local to the hashing code (the daemon's backend, or the
#: client's own file or qemu-nbd), so a window costs one cheap call and
#: can be small; the client walking a server's extents over HTTP pays a
#: round trip per window and asks for far more at once
#: (``client/session.py``).
CHECKSUM_EXTENTS_WINDOW = 1024 * MiB
#: Zero-block digests fed to the outer hash in one call: few calls for
#: a terabyte of zeros, yet at most a few MiB of digests in memory.
ZERO_DIGESTS_PER_UPDATE = 32768


#: Called with a byte count: the image's size once, then each step's bytes.
Progress = Callable[[int], None]


class Source(Protocol):
    """The image being hashed: a daemon backend, a local file, an export."""

    def size(self) -> int: ...

    def extents(self, start: int, length: int) -> Iterable[Extent]: ...

    def readinto(self, buf: memoryview, offset: int) -> int: ...


class _Hash(Protocol):
    """What of a ``hashlib`` object the scheme uses."""

    def update(self, data: bytes | memoryview, /) -> None: ...

    def digest(self) -> bytes: ...

    def hexdigest(self) -> str: ...


#: The blake2 variants, which take the digest size the scheme fixes.
#: Other spellings of them (OpenSSL's "blake2b512") refuse a digest size,
#: so they are not offered.
_BLAKE2: dict[str, Callable[..., _Hash]] = {
    "blake2b": hashlib.blake2b,
    "blake2s": hashlib.blake2s,
}


def _usable_algorithms() -> list[str]:
    """Algorithms of this Python build that give a fixed-size digest.

    ``hashlib.algorithms_available`` also lists the shake variants, whose
    digest needs a length that this scheme does not carry, and may list
    OpenSSL names that fail at use (a provider not loaded); both are left
    out so that every advertised algorithm works.
    """
    usable = []
    for name in hashlib.algorithms_available:
        try:
            _new_hash(name).digest()
        except (TypeError, ValueError):
            continue
        usable.append(name)
    return sorted(usable)


def _new_hash(algorithm: str, data: bytes | memoryview = b"") -> _Hash:
    if algorithm.startswith("blake2"):
        blake2 = _BLAKE2.get(algorithm)
        if blake2 is None:
            raise TypeError(f"{algorithm} takes no digest size")
        return blake2(data, digest_size=BLAKE2_DIGEST_SIZE)
    return hashlib.new(algorithm, data)


ALGORITHMS = _usable_algorithms()


def algorithms() -> dict[str, list[str]]:
    """The JSON answer of ``GET /images/{id}/checksum/algorithms``."""
    return {"algorithms": list(ALGORITHMS)}


def validate(algorithm: str | None = None,
             block_size: int | str | None = None) -> tuple[str, int]:
    """Check request parameters; return ``(algorithm, block_size)``.

    None means the default. ``block_size`` may be the query string text.
    Raises BadRequest naming the bad parameter.
    """
    if algorithm is None:
        algorithm = DEFAULT_ALGORITHM
    elif algorithm not in ALGORITHMS:
        raise BadRequest(
            f"Invalid 'algorithm' query parameter: {algorithm[:40]!r}; "
            f"expecting one of {', '.join(ALGORITHMS)}")

    if block_size is None:
        block_size = DEFAULT_BLOCK_SIZE
    else:
        if isinstance(block_size, str) and \
                len(block_size) > MAX_BLOCK_SIZE_DIGITS:
            raise BadRequest(f"Invalid block_size {block_size[:20]!r}...: "
                             f"too long")
        try:
            block_size = int(block_size)
        except (TypeError, ValueError):
            raise BadRequest(
                f"Invalid block_size {block_size!r}: not an integer") from None
    if not MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE:
        raise BadRequest(
            f"Invalid block_size {block_size}: must be between "
            f"{MIN_BLOCK_SIZE} and {MAX_BLOCK_SIZE}")
    if block_size % BLOCK_SIZE_ALIGNMENT:
        raise BadRequest(
            f"Invalid block_size {block_size}: must be a multiple of "
            f"{BLOCK_SIZE_ALIGNMENT}")
    return algorithm, block_size


@functools.lru_cache(maxsize=16)
def _zero_digest(algorithm: str, length: int) -> bytes:
    """Digest of ``length`` zero bytes; computed once per size."""
    return _new_hash(algorithm, bytes(length)).digest()


class BlockHash:
    """The outer hash, fed with image blocks in order.

    Call ``update(block)`` for every block read, ``zero(length)`` for a
    run of zero blocks; both must start on a block boundary, and only
    the image's last block may be shorter than ``block_size``.
    """

    def __init__(self, algorithm: str = DEFAULT_ALGORITHM,
                 block_size: int = DEFAULT_BLOCK_SIZE) -> None:
        self.algorithm = algorithm
        self.block_size = block_size
        self._outer = _new_hash(algorithm)
        # calloc'd memory: comparing with it touches no real pages.
        self._zero_block = bytes(block_size)

    def update(self, block: bytes | memoryview) -> None:
        """Hash one block of data (zero blocks take the precomputed digest)."""
        if self._zero_block.startswith(block):
            self.zero(len(block))
        else:
            self._outer.update(_new_hash(self.algorithm, block).digest())

    def zero(self, length: int) -> None:
        """Hash ``length`` bytes of zeros: whole blocks, then a shorter tail."""
        whole, tail = divmod(length, self.block_size)
        digest = _zero_digest(self.algorithm, self.block_size)
        while whole:
            count = min(whole, ZERO_DIGESTS_PER_UPDATE)
            self._outer.update(digest * count)
            whole -= count
        if tail:
            self._outer.update(_zero_digest(self.algorithm, tail))

    def hexdigest(self) -> str:
        return self._outer.hexdigest()


def block_runs(extents: Iterable[Extent], start: int, end: int,
               block_size: int) -> Iterator[tuple[int, int, bool]]:
    """Split ``[start, end)`` into runs of zero blocks and of data blocks.

    ``start`` is a multiple of ``block_size``; ``end`` is one too, or the
    end of the image. A block is zero only when zero extents cover all of
    it; any block touched by data, or not covered by an extent at all,
    is data and must be read. Yields ``(run_start, run_end, zero)``.
    """
    position = start
    for zero_start, zero_end in _zero_spans(extents, start, end):
        first = -(-zero_start // block_size) * block_size
        last = end if zero_end == end else zero_end // block_size * block_size
        if last <= first:
            continue
        if position < first:
            yield position, first, False
        yield first, last, True
        position = last
    if position < end:
        yield position, end, False


def _zero_spans(extents: Iterable[Extent], start: int,
                end: int) -> Iterator[tuple[int, int]]:
    """Merged zero ranges of ``extents``, clipped to ``[start, end)``."""
    span: tuple[int, int] | None = None
    for extent in sorted(extents, key=lambda e: e.start):
        if not extent.zero:
            continue
        low, high = max(extent.start, start), min(extent.end, end)
        if low >= high:
            continue
        if span is not None and low <= span[1]:
            span = span[0], max(span[1], high)
            continue
        if span is not None:
            yield span
        span = low, high
    if span is not None:
        yield span


def compute(backend: Source, algorithm: str = DEFAULT_ALGORITHM,
            block_size: int = DEFAULT_BLOCK_SIZE,
            progress: Progress | None = None,
            started: Progress | None = None) -> dict[str, object]:
    """Checksum the image of ``backend``; returns the JSON answer.

    Zero extents are hashed without reading; data is read into one
    reused buffer. ``started(size)``, when given, is called once with the
    image's size, then ``progress(count)`` with the bytes accounted after
    each step; an exception it raises (for example because the transfer
    was canceled) stops the computation.
    """
    algorithm, block_size = validate(algorithm, block_size)
    size = backend.size()
    if started:
        started(size)
    block_hash = BlockHash(algorithm, block_size)
    buf = bytearray(block_size)
    window = max(1, CHECKSUM_EXTENTS_WINDOW // block_size) * block_size

    with memoryview(buf) as view:
        for window_start in range(0, size, window):
            window_end = min(window_start + window, size)
            extents = backend.extents(window_start, window_end - window_start)
            runs = block_runs(extents, window_start, window_end, block_size)
            for run_start, run_end, zero in runs:
                if zero:
                    block_hash.zero(run_end - run_start)
                    if progress:
                        progress(run_end - run_start)
                    continue
                _hash_data(backend, run_start, run_end, view, block_hash,
                           progress)

    return {
        "algorithm": algorithm,
        "block_size": block_size,
        "checksum": block_hash.hexdigest(),
    }


def _hash_data(backend: Source, start: int, end: int, view: memoryview,
               block_hash: BlockHash, progress: Progress | None) -> None:
    """Read and hash the data blocks of ``[start, end)`` through ``view``."""
    block_size = len(view)
    for offset in range(start, end, block_size):
        length = min(block_size, end - offset)
        _read_fully(backend, offset, view[:length])
        block_hash.update(view[:length])
        if progress:
            progress(length)


def _read_fully(backend: Source, offset: int, view: memoryview) -> None:
    done = 0
    while done < len(view):
        count = backend.readinto(view[done:], offset + done)
        if count == 0:
            raise BackendError(
                f"image ended at {offset + done}, before its size "
                f"(reading {len(view)} bytes at {offset})")
        done += count


def compute_file(path: str | os.PathLike[str],
                 algorithm: str = DEFAULT_ALGORITHM,
                 block_size: int = DEFAULT_BLOCK_SIZE,
                 progress: Progress | None = None,
                 started: Progress | None = None) -> dict[str, object]:
    """Checksum a local raw image (regular file or block device).

    Gives the digest the daemon gives for the same content, so a client
    can verify a transfer; holes (SEEK_DATA/SEEK_HOLE) are not read.
    """
    image = _LocalImage(os.fspath(path))
    try:
        return compute(image, algorithm, block_size, progress=progress,
                       started=started)
    finally:
        image.close()


class _LocalImage:
    """The three calls ``compute`` makes, on a local file or block device."""

    def __init__(self, path: str) -> None:
        try:
            self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise BackendError(f"Cannot open {path}: {e.strerror}") from e
        self._size = os.lseek(self._fd, 0, os.SEEK_END)

    def size(self) -> int:
        return self._size

    def extents(self, start: int, length: int) -> list[Extent]:
        return file_extents(self._fd, start, min(start + length, self._size))

    def readinto(self, buf: memoryview, offset: int) -> int:
        return os.preadv(self._fd, [buf], offset)

    def close(self) -> None:
        os.close(self._fd)
