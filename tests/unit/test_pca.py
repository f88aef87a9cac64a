"""fit-pca: the streaming covariance equals the covariance of all pixels at once."""

import numpy as np
import pytest

import pipelines
from pipelines import pca


def test_streaming_fit_matches_numpy_on_all_pixels():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, size=(rng.integers(5, 40), rng.integers(5, 40), 3), dtype=np.uint8) for _ in range(12)]
    # Correlate the channels so the eigen-pairs are not degenerate.
    images = [np.clip(im.astype(int) @ np.array([[1.0, 0.5, 0.2], [0.0, 0.8, 0.3], [0.0, 0.0, 0.5]]), 0, 255).astype(np.uint8) for im in images]
    result = pca.fit(iter(images))
    pixels = np.concatenate([im.reshape(-1, 3) for im in images]).astype(np.float64) / 255.0
    covariance = np.cov(pixels, rowvar=False, bias=True)
    eigvec = np.asarray(result.eigvec)
    eigval = np.asarray(result.eigval)
    np.testing.assert_allclose(covariance @ eigvec, eigvec * eigval, atol=1e-10)
    np.testing.assert_allclose(np.sort(np.linalg.eigvalsh(covariance))[::-1], eigval, atol=1e-12)
    assert list(eigval) == sorted(eigval, reverse=True)
    np.testing.assert_allclose(eigvec.T @ eigvec, np.eye(3), atol=1e-10)
    assert result.images == 12 and result.pixels == pixels.shape[0]


def test_fit_recovers_a_known_covariance():
    rng = np.random.default_rng(1)
    basis = np.linalg.qr(rng.normal(size=(3, 3)))[0]
    spreads = np.array([40.0, 15.0, 5.0])
    values = 128 + (rng.normal(size=(200_000, 3)) * spreads) @ basis.T
    image = np.clip(np.rint(values), 0, 255).astype(np.uint8).reshape(400, 500, 3)
    result = pca.fit([image])
    np.testing.assert_allclose(result.eigval, (spreads / 255.0) ** 2, rtol=0.03)
    for k in range(3):  # eigenvectors up to sign
        assert abs(abs(np.asarray(result.eigvec)[:, k] @ basis[:, k]) - 1) < 1e-3


def test_with_fit_writes_every_pca_op_and_refuses_specs_without_one():
    fit = pca.PcaFit(eigval=(0.3, 0.02, 0.001), eigvec=((1, 0, 0), (0, 1, 0), (0, 0, 1)), mean=(0.5, 0.5, 0.5), images=1, pixels=4)
    spec = pca.with_fit(pipelines.load_preset("alexnet"), fit)
    op = next(o for o in spec.ops if o.op == "pca_color")
    assert op.eigval == (0.3, 0.02, 0.001) and op.eigvec[2] == (0, 0, 1)
    with pytest.raises(ValueError, match="has no pca_color op"):
        pca.with_fit(pipelines.load_preset("mobilenet"), fit)


def test_grey_images_are_refused():
    with pytest.raises(ValueError, match="needs RGB uint8"):
        pca.fit([np.zeros((4, 4, 1), np.uint8)])
