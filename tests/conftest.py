"""Shared test set-up: no network for albumentations, single-threaded OpenCV like a worker process."""

import os
import shutil
import subprocess
import tempfile

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
# One keyring for the whole session (daemons, workers and trainers of the tests share it, as one user's
# processes do), never the developer's own ~/.config/augserve/keys.
_SESSION_KEYS = tempfile.mkdtemp(prefix="augserve-test-keys-")
os.environ["AUGSERVE_KEYS_DIR"] = os.path.join(_SESSION_KEYS, "keys")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

cv2.setNumThreads(1)


def pytest_sessionfinish(session, exitstatus):
    """The session's keyring holds secret keys: it does not outlive the session (each xdist worker
    process has its own)."""
    shutil.rmtree(_SESSION_KEYS, ignore_errors=True)


@pytest.fixture
def rgb_batch():
    """Eight smooth-ish RGB uint8 images, 64×80 (smooth content keeps interpolation differences small)."""
    rng = np.random.default_rng(1234)
    base = rng.integers(0, 256, size=(8, 8, 10, 3), dtype=np.uint8)
    return np.stack([cv2.resize(b, (80, 64), interpolation=cv2.INTER_CUBIC) for b in base])


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 1 MB tmpfs mounted for this test (root only); unmounted afterwards."""
    target = tmp_path / "tiny"
    target.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(target)], capture_output=True, timeout=10)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode(errors='replace').strip()}")
    yield str(target)
    subprocess.run(["umount", str(target)], capture_output=True, timeout=10)


@pytest.fixture
def shm_dir():
    """A private directory in /dev/shm for one test's slots (unit tests of the hand-off), removed afterwards."""
    directory = tempfile.mkdtemp(prefix="augserve-test-", dir="/dev/shm")
    yield directory
    shutil.rmtree(directory, ignore_errors=True)
