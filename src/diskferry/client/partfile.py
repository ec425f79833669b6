"""A new local image made as ``PATH.part`` and given its name at the end.

A download into a new image must never leave a half-written file under
the name asked for: it writes ``PATH.part``, and ``commit`` renames it
once everything is written and synced. A copy that fails leaves the
``with`` block without committing, and the part file goes.
"""

from __future__ import annotations

import os
from types import TracebackType
from typing import Self


class PartFile:
    """What the destinations writing a new image share: the part file's
    name, the rename, and the clean-up of a copy that did not finish."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._part: str | None = path + ".part"

    @property
    def part(self) -> str:
        """The file written until ``commit``."""
        assert self._part is not None, "committed already"
        return self._part

    def _rename(self) -> None:
        """Give the finished image its name."""
        os.rename(self.part, self.path)
        self._part = None

    def _abandon(self) -> None:
        """Let go of what writes the part file, before it is removed."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None,
                 exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._part is None:
            return
        self._abandon()
        try:
            os.unlink(self._part)
        except FileNotFoundError:
            pass
