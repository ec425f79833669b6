"""bench/README.md describes what is in the repository, and all of it."""

from __future__ import annotations

import re
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def test_names_only_what_is_here():
    text = (BENCH / "README.md").read_text()
    # No instructions to run what lies outside the repository.
    assert "../" not in text
    # Every file it names as `name.ext` is here...
    for name in re.findall(r"`(?:bench/)?([\w./-]+\.(?:sh|py|md))`", text):
        assert (BENCH / name).exists() or (BENCH / "results" / name).exists(), name
    # ...and every file here is described.
    for path in BENCH.rglob("*"):
        if path.is_file() and path.name != "README.md":
            assert f"`{path.name}`" in text, path
