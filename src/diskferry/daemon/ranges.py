"""A set of byte ranges, merged as they are added.

Counts bytes moved through a ticket with overlapping ranges counted once.
Sequential transfers keep it to a handful of ranges.
"""

import bisect
from collections.abc import Collection, Iterator


class RangeSet:
    """Disjoint, sorted half-open ranges ``[start, end)``."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []

    def add(self, start: int, end: int) -> None:
        if end <= start:
            return
        # Every range that overlaps or touches [start, end) is merged.
        lo = bisect.bisect_left(self._ends, start)
        hi = bisect.bisect_right(self._starts, end)
        if lo < hi:
            start = min(start, self._starts[lo])
            end = max(end, self._ends[hi - 1])
        self._starts[lo:hi] = [start]
        self._ends[lo:hi] = [end]

    def total(self, extra: Collection[tuple[int, int]] = ()) -> int:
        """Bytes covered, with ``extra`` ranges counted as if added."""
        if extra:
            merged = RangeSet()
            merged._starts = list(self._starts)
            merged._ends = list(self._ends)
            for start, end in extra:
                merged.add(start, end)
            return merged.total()
        return sum(self._ends) - sum(self._starts)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(zip(self._starts, self._ends, strict=True))
