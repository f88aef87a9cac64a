"""The OpenCV kernels of the CPU backends: the resize fast path against the warp it replaces."""

import numpy as np
import pytest

import pipelines
from pipelines.backends import opencv_kernels as K
from pipelines.backends.opencv_kernels import _edge_strips, _resize_region
from pipelines.plan import SamplePlan, axis_aligned


def noise(count=6, shape=(64, 80, 3), seed=7):
    return np.random.default_rng(seed).integers(0, 256, (count, *shape), dtype=np.uint8)


def plans_for(spec, images, seed=3):
    pipe = pipelines.build(spec)
    return pipe.plans(pipe._sample([image.shape for image in images], seed, 0, None))


AXIS_ALIGNED = {
    "random_resized_crop": [{"op": "random_resized_crop", "size": [48, 56]}],
    "random_resized_crop mirrored": [{"op": "random_resized_crop", "size": [48, 56]}, {"op": "mirror", "horizontal": 0.5, "vertical": 0.5}],
    "resize up": [{"op": "resize", "short_side": 100}],
    "resize down": [{"op": "resize", "short_side": 40}],
    "resize then crop": [{"op": "resize", "short_side": [72, 90]}, {"op": "random_crop", "size": 64}],
}


@pytest.mark.parametrize("ops", AXIS_ALIGNED.values(), ids=AXIS_ALIGNED.keys())
@pytest.mark.parametrize("border, fill", [("constant", 0), ("constant", 130), ("replicate", 0)])
@pytest.mark.parametrize("channels", [3, 1])
def test_resize_path_matches_the_warp(ops, border, fill, channels):
    """Float weights, one rounding: within one level of warpAffine everywhere, on raw noise (the
    worst case), and on few values. Measured: max 1, mean <= 0.011 (down-scaling, where warpAffine's
    fixed-point taps differ most)."""
    images = noise(shape=(64, 80, channels))
    plans = plans_for({"ops": ops}, images)
    facts = axis_aligned(plans)
    used = 0
    for i, (image, plan) in enumerate(zip(images, plans)):
        assert facts.aligned[i]
        fast = K.resize_window(image, facts, i, plan.out_hw, border, fill, None)
        if fast is None:
            continue
        used += 1
        slow = K.warp_affine(image, plan.inverse, plan.out_hw, border, fill)
        assert fast.shape == slow.shape == (*plan.out_hw, channels) and fast.dtype == np.uint8
        diff = np.abs(fast.astype(np.int16) - slow.astype(np.int16))
        assert diff.max() <= 1 and diff.mean() < 0.02, (diff.max(), diff.mean())
    assert used >= len(plans) // 2  # the fast path is taken, not skipped


def test_resize_path_writes_into_the_batch_slot():
    images = noise(count=4)
    plans = plans_for({"ops": AXIS_ALIGNED["random_resized_crop mirrored"]}, images)
    facts = axis_aligned(plans)
    out = np.zeros((len(plans), 48, 56, 3), dtype=np.uint8)
    for i, (image, plan) in enumerate(zip(images, plans)):
        result = K.resize_window(image, facts, i, plan.out_hw, "constant", 0, out[i])
        assert result is not None and np.shares_memory(result, out[i])
        np.testing.assert_array_equal(out[i], K.resize_window(image, facts, i, plan.out_hw, "constant", 0, None))


@pytest.mark.parametrize("mirror", [(False, False), (True, False), (False, True), (True, True)])
def test_edge_strips_are_the_warp_exactly(mirror):
    """Output pixels whose taps reach past the region are computed by the warp itself — also when
    the region is mirrored before it is resized."""
    from pipelines import geometry as G

    image = noise(count=1, shape=(40, 40, 3))[0]
    # Enlarge the 10×10 box at (5, 7) to 40×40: scale 0.25, strips of 2 outputs on each side.
    inverse = np.array([[0.25, 0.0, 7.0], [0.0, 0.25, 5.0], [0.0, 0.0, 1.0]]) @ G.mirror_matrix(*mirror, 40, 40)
    plan = SamplePlan((40, 40, 3), (40, 40), inverse=inverse)
    facts = axis_aligned([plan])
    fast = K.resize_window(image, facts, 0, (40, 40), "constant", 0, None)
    slow = K.warp_affine(image, inverse, (40, 40), "constant", 0)
    assert _edge_strips(7.0, 0.25, 40, 7, 17) == (2, 2)
    np.testing.assert_array_equal(fast[:2], slow[:2])
    np.testing.assert_array_equal(fast[-2:], slow[-2:])
    np.testing.assert_array_equal(fast[:, :2], slow[:, :2])
    np.testing.assert_array_equal(fast[:, -2:], slow[:, -2:])
    assert np.abs(fast.astype(int) - slow.astype(int)).max() <= 1


def test_resize_region_needs_a_whole_pixel_start():
    # Starts on a whole pixel: no skipped outputs.
    assert _resize_region(7.0, 0.5, 20, 64) == (7, 0, 10)
    # A resize followed by a crop at output column 6: the region starts at 0 and 6 outputs are dropped.
    assert _resize_region(6 * 0.8, 0.8, 10, 64) == (0, 6, 13)
    # A sub-pixel start that no whole-pixel region reaches: the warp runs instead.
    assert _resize_region(0.3, 0.7, 10, 64) is None
    # The region would have to leave the image.
    assert _resize_region(60.0, 1.0, 10, 64) is None


def test_no_resize_for_plans_that_are_not_axis_aligned():
    images = noise(count=4)
    plans = plans_for({"ops": [{"op": "rotate", "degrees": 20}]}, images)
    facts = axis_aligned(plans)
    assert not facts.aligned.any() and not facts.copies.any()
