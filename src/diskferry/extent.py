"""The extent record shared by backends, handlers and the client."""

from collections import namedtuple


class Extent(namedtuple("Extent", "start length zero hole dirty",
                        defaults=(False, False))):
    """A run of an image with the same allocation state.

    ``zero``: the range reads as zeros. ``hole``: it is not allocated (a
    hole is always zero). ``dirty`` is only meaningful in the dirty context.
    A named tuple, not a dataclass: cheap to make by the thousand, and
    cheap to import for a command-line client.
    """

    __slots__ = ()

    @property
    def end(self):
        return self.start + self.length
