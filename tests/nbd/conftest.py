"""Fixtures for NBD client tests: real servers, killed at teardown, and
the scripted server of fake_server.py."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .fake_server import FakeServer
from .procs import Servers

MakeServer = Callable[..., FakeServer]


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Servers]:
    s = Servers(tmp_path)
    yield s
    s.stop()


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[MakeServer]:
    made: list[FakeServer] = []

    def make(**kwargs: Any) -> FakeServer:
        srv = FakeServer(tmp_path / f"fake{len(made)}.sock", **kwargs)
        made.append(srv)
        return srv

    yield make
    for srv in made:
        srv.close()
    for srv in made:
        assert not srv.errors, srv.errors
