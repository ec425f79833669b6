"""A loop device over a file, for tests that need a real block device."""

import contextlib
import os
import shutil
import subprocess

import pytest


@contextlib.contextmanager
def attached(backing):
    """Yield a loop device over ``backing``, detached afterwards; skip the
    test where loop devices cannot be had (not root, no losetup, none
    free in this sandbox)."""
    if os.geteuid() != 0 or shutil.which("losetup") is None:
        pytest.skip("loop devices need root and losetup")
    run = subprocess.run(["losetup", "--find", "--show", str(backing)],
                         capture_output=True, text=True)
    if run.returncode != 0:
        pytest.skip(f"losetup cannot attach a loop device here: {run.stderr}")
    dev = run.stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)
