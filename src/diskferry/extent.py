"""The extent record shared by backends, handlers, the NBD client and the client."""

from typing import NamedTuple


class Extent(NamedTuple):
    """A run of an image with the same allocation state.

    ``zero``: the range reads as zeros. ``hole``: no layer of the image
    allocates the range: not the file (a raw file's hole), nor any image
    of a backing chain (``qemu:allocation-depth`` 0). A hole always reads
    as zeros; a zero range that is not a hole is allocated zeros, or zeros
    some layer provides, and a copy of one layer alone must write it.
    ``dirty`` is only meaningful in the dirty context.

    A named tuple, not a dataclass: cheap to make by the thousand, and
    cheap to import for a command-line client.
    """

    start: int
    length: int
    zero: bool
    hole: bool = False
    dirty: bool = False

    @property
    def end(self) -> int:
        return self.start + self.length
