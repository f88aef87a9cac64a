"""Shared test set-up: no network for albumentations, single-threaded OpenCV like a worker process."""

import os
import tempfile

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
# One keyring for the whole session (daemons, workers and trainers of the tests share it, as one user's
# processes do), never the developer's own ~/.config/augserve/keys.
os.environ["AUGSERVE_KEYS_DIR"] = os.path.join(tempfile.mkdtemp(prefix="augserve-test-keys-"), "keys")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

cv2.setNumThreads(1)


@pytest.fixture
def rgb_batch():
    """Eight smooth-ish RGB uint8 images, 64×80 (smooth content keeps interpolation differences small)."""
    rng = np.random.default_rng(1234)
    base = rng.integers(0, 256, size=(8, 8, 10, 3), dtype=np.uint8)
    return np.stack([cv2.resize(b, (80, 64), interpolation=cv2.INTER_CUBIC) for b in base])
