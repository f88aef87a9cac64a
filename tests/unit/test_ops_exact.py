"""Exact expectations, on every backend: a mirror is np.flip, a no-op geometry is the identity,
pca_color adds exactly eigvec @ (alpha * eigval), color_shift adds its offsets."""

import numpy as np
import pytest

import pipelines
from pipelines.pipeline import as_uint8_numpy

BACKENDS = pipelines.BACKENDS.names()


def run(spec, images, backend, **kwargs):
    pipe = pipelines.build(spec, backend=backend)
    return as_uint8_numpy(pipe(images, **kwargs)), pipe


@pytest.mark.parametrize("backend", BACKENDS)
def test_mirror_is_np_flip(rgb_batch, backend):
    out, pipe = run({"ops": [{"op": "mirror", "horizontal": 1.0}]}, rgb_batch, backend)
    np.testing.assert_array_equal(out, np.flip(rgb_batch, axis=2))
    out, _ = run({"ops": [{"op": "mirror", "horizontal": 0.0, "vertical": 1.0}]}, rgb_batch, backend)
    np.testing.assert_array_equal(out, np.flip(rgb_batch, axis=1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_mirror_follows_its_recorded_draw(rgb_batch, backend):
    spec = {"ops": [{"op": "mirror", "horizontal": 0.5}]}
    out, pipe = run(spec, rgb_batch, backend, seed=7)
    records = pipe.sample_params([im.shape for im in rgb_batch], seed=7)
    flipped = [r.ops[0]["horizontal"] for r in records]
    assert 0 < sum(flipped) < len(flipped)  # both outcomes occur in this batch at seed 7
    for image, result, flip in zip(rgb_batch, out, flipped):
        np.testing.assert_array_equal(result, np.flip(image, axis=1) if flip else image)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_rotation_zero_shear_full_crop_is_identity(rgb_batch, backend):
    spec = {
        "ops": [
            {"op": "random_resized_crop", "size": [64, 80], "scale": [1.0, 1.0], "ratio": [1.25, 1.25]},
            {"op": "rotate", "degrees": 0},
            {"op": "shear", "degrees": 0},
            {"op": "random_crop", "size": [64, 80]},
            {"op": "center_crop", "size": [64, 80]},
        ]
    }
    out, _ = run(spec, rgb_batch, backend)
    np.testing.assert_array_equal(out, rgb_batch)


@pytest.mark.parametrize("backend", BACKENDS)
def test_center_crop_is_a_slice(rgb_batch, backend):
    out, _ = run({"ops": [{"op": "center_crop", "size": [32, 40]}]}, rgb_batch, backend)
    np.testing.assert_array_equal(out, rgb_batch[:, 16:48, 20:60])


@pytest.mark.parametrize("backend", BACKENDS)
def test_random_crop_is_a_shifted_window_with_zero_padding(rgb_batch, backend):
    out, pipe = run({"ops": [{"op": "random_crop", "size": [64, 80], "padding": 4}]}, rgb_batch, backend, seed=3)
    records = pipe.sample_params([im.shape for im in rgb_batch], seed=3)
    for image, result, record in zip(rgb_batch, out, records):
        top, left = record.ops[0]["top"], record.ops[0]["left"]
        padded = np.pad(image, ((4, 4), (4, 4), (0, 0)))
        np.testing.assert_array_equal(result, padded[top + 4 : top + 4 + 64, left + 4 : left + 4 + 80])


def _pca_expected(image, record, eigval, eigvec):
    alpha = np.asarray(record["alpha"])
    offset = np.asarray(eigvec) @ (alpha * np.asarray(eigval)) * 255.0
    np.testing.assert_allclose(record["offset"], offset, rtol=1e-12)
    return np.clip(np.rint(image.astype(np.float64) + offset), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pca_color_adds_eigvec_alpha_eigval(rgb_batch, backend):
    op = {"op": "pca_color", "alpha_std": 0.5}
    spec = pipelines.PipelineSpec.model_validate({"ops": [op]})
    out, pipe = run(spec, rgb_batch, backend, seed=11)
    records = pipe.sample_params([im.shape for im in rgb_batch], seed=11)
    for image, result, record in zip(rgb_batch, out, records):
        expected = _pca_expected(image, record.ops[0], spec.ops[0].eigval, spec.ops[0].eigvec)
        # One offset per image, added to every pixel: exact up to float32 rounding at .5 boundaries.
        assert np.abs(result.astype(int) - expected).max() <= 1
        assert np.mean(result == expected) > 0.999


@pytest.mark.parametrize("backend", BACKENDS)
def test_color_shift_adds_its_offsets(rgb_batch, backend):
    out, pipe = run({"ops": [{"op": "color_shift", "r": 30, "g": 0, "b": 10}]}, rgb_batch, backend, seed=5)
    records = pipe.sample_params([im.shape for im in rgb_batch], seed=5)
    for image, result, record in zip(rgb_batch, out, records):
        offset = np.asarray(record.ops[0]["offset"])
        assert abs(offset[0]) <= 30 and offset[1] == 0 and abs(offset[2]) <= 10
        expected = np.clip(np.rint(image + offset), 0, 255).astype(np.uint8)
        assert np.abs(result.astype(int) - expected).max() <= 1
        assert np.mean(result == expected) > 0.999


def test_pca_color_refuses_grey_images():
    with pytest.raises(ValueError, match="pca_color needs RGB images"):
        pipelines.build({"ops": [{"op": "pca_color"}]})(np.zeros((2, 8, 8, 1), np.uint8))


def test_crop_and_mirror_chains_are_exact_pixel_copies(rgb_batch):
    """A crop followed by flips moves whole pixels: every backend must return exactly those pixels."""
    spec = {"ops": [{"op": "center_crop", "size": [40, 50]}, {"op": "mirror", "horizontal": 1.0, "vertical": 1.0}]}
    expected = rgb_batch[:, 12:52, 15:65][:, ::-1, ::-1]
    for backend in BACKENDS:
        out, _ = run(spec, rgb_batch, backend)
        np.testing.assert_array_equal(out, expected, err_msg=backend)
