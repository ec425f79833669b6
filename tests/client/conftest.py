"""Fixtures for client tests (helpers live in ``helpers.py``)."""

import pytest

from .helpers import CuttingRelay


@pytest.fixture
def relay():
    """relay(server, cut_after, direction) -> CuttingRelay (closed at teardown)."""
    made = []

    def make(srv, cut_after, direction="up"):
        r = CuttingRelay((srv.host, srv.port), cut_after, direction)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()
