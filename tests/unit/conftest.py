"""Fixtures shared by the unit tests of the shared-memory hand-off (host and device slots)."""

import shutil
import tempfile

import pytest


@pytest.fixture
def shm_dir():
    """A private directory in /dev/shm for one test's slots, removed afterwards."""
    directory = tempfile.mkdtemp(prefix="augserve-test-", dir="/dev/shm")
    yield directory
    shutil.rmtree(directory, ignore_errors=True)
