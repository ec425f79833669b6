"""Storage for the conformance suite: every images-API test runs on a
file ticket and on NBD tickets (qemu-nbd and nbdkit serving the same
file), against both daemons. The root conftest's ``make_ticket`` makes
the ticket for the ``storage`` parameter chosen here.

A test module opts in with ``pytestmark = pytest.mark.all_storages``;
a test whose subject exists only for files (holes of a raw file, an image
shorter than its ticket) is marked ``file_only``. Nothing is skipped: a
test runs on every storage it applies to and is not generated for the
others.
"""

from __future__ import annotations

import nbd_servers

ALL_STORAGES = ("file",) + nbd_servers.NBD_KINDS


def pytest_generate_tests(metafunc):
    definition = metafunc.definition
    if ("storage" in metafunc.fixturenames and
            definition.get_closest_marker("all_storages") and
            not definition.get_closest_marker("file_only")):
        metafunc.parametrize("storage", ALL_STORAGES)
