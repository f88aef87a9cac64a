"""The OpenCV kernels of the CPU backends: the window path of axis-aligned plans against the warp it replaces."""

import cv2
import numpy as np
import pytest

import pipelines
from pipelines import geometry as G
from pipelines.backends import opencv_kernels as K
from pipelines.backends.opencv_kernels import _tap_span
from pipelines.plan import SamplePlan, axis_aligned
from pipelines.source_map import opencv_maps


def noise(count=6, shape=(64, 80, 3), seed=7):
    return np.random.default_rng(seed).integers(0, 256, (count, *shape), dtype=np.uint8)


def plans_for(spec, images, seed=3):
    pipe = pipelines.build(spec)
    return pipe.plans(pipe._sample([image.shape for image in images], seed, 0, None))


AXIS_ALIGNED = {
    "random_resized_crop": [{"op": "random_resized_crop", "size": [48, 56]}],
    "random_resized_crop flipped": [{"op": "random_resized_crop", "size": [48, 56]}, {"op": "mirror", "horizontal": 1.0}],
    "random_resized_crop both ways": [{"op": "random_resized_crop", "size": [48, 56]}, {"op": "mirror", "horizontal": 1.0, "vertical": 1.0}],
    "flipped then cropped and enlarged": [{"op": "mirror", "vertical": 1.0, "horizontal": 0.0}, {"op": "random_resized_crop", "size": 96, "scale": [0.05, 0.2]}],
    "resize up": [{"op": "resize", "short_side": 100}, {"op": "mirror", "horizontal": 1.0}],
    "resize down": [{"op": "resize", "short_side": 40}],
    "resize down flipped": [{"op": "resize", "short_side": 40}, {"op": "mirror", "horizontal": 1.0}],
    # Windows that leave the image: the border mode decides the taps there.
    "resize then padded crop": [{"op": "resize", "short_side": [72, 90]}, {"op": "random_crop", "size": 64, "padding": 12}, {"op": "mirror", "horizontal": 1.0}],
}


@pytest.mark.parametrize("ops", AXIS_ALIGNED.values(), ids=AXIS_ALIGNED.keys())
@pytest.mark.parametrize("border, fill", [("constant", 0), ("constant", 130), ("replicate", 0)])
@pytest.mark.parametrize("channels", [3, 1])
def test_window_path_matches_the_warp(ops, border, fill, channels):
    """The same samples as warpAffine with the plan's matrix, on raw noise (the worst case): only the
    float rounding of the coordinates differs. Measured: max 1, mean <= 0.009."""
    images = noise(shape=(64, 80, channels))
    plans = plans_for({"ops": ops}, images)
    facts = axis_aligned(plans)
    for i, (image, plan) in enumerate(zip(images, plans)):
        assert facts.aligned[i] and not facts.copies[i]
        fast = K.warp_window(image, K.tap_windows(facts), i, plan.out_hw, border, fill, None)
        slow = K.warp_affine(image, plan.inverse, plan.out_hw, border, fill)
        assert fast.shape == slow.shape == (*plan.out_hw, channels) and fast.dtype == np.uint8
        diff = np.abs(fast.astype(np.int16) - slow.astype(np.int16))
        assert diff.max() <= 1 and diff.mean() < 0.02, (diff.max(), diff.mean())


def test_the_cases_above_take_both_borders():
    """Windows inside the image (warped with the replicate border: no tap can leave them) and windows
    clipped by the image edge (the spec's border mode) both occur in the comparison above."""
    inside = [K.tap_windows(axis_aligned(plans_for({"ops": ops}, noise()))).inside for ops in AXIS_ALIGNED.values()]
    assert any(any(flags) for flags in inside) and any(not all(flags) for flags in inside)


def test_window_path_writes_into_the_batch_slot():
    images = noise(count=4)
    plans = plans_for({"ops": AXIS_ALIGNED["random_resized_crop both ways"]}, images)
    facts = axis_aligned(plans)
    out = np.zeros((len(plans), 48, 56, 3), dtype=np.uint8)
    for i, (image, plan) in enumerate(zip(images, plans)):
        result = K.warp_window(image, K.tap_windows(facts), i, plan.out_hw, "constant", 0, out[i])
        assert result is not None and np.shares_memory(result, out[i])
        np.testing.assert_array_equal(out[i], K.warp_window(image, K.tap_windows(facts), i, plan.out_hw, "constant", 0, None))


def test_window_path_reads_only_near_the_taps():
    """Pixels more than one pixel away from every tap do not reach the output: the window is the taps'
    span plus a margin of one."""
    image = noise(count=1, shape=(40, 40, 3))[0]
    # Enlarge the 10×10 box at (5, 7) to 40×40, mirrored: the taps span columns 6-17 and rows 4-15.
    inverse = np.array([[0.25, 0.0, 7.0], [0.0, 0.25, 5.0], [0.0, 0.0, 1.0]]) @ G.mirror_matrix(True, False, 40, 40)
    plan = SamplePlan((40, 40, 3), (40, 40), inverse=inverse)
    facts = axis_aligned([plan])
    assert _tap_span(7.0, 0.25, 40, 40) == (5, 19, True) and _tap_span(5.0, 0.25, 40, 40) == (3, 17, True)
    spoiled = image.copy()
    spoiled[:, :5] = spoiled[:, 19:] = spoiled[:3] = spoiled[17:] = 255
    expected = K.warp_affine(image, inverse, (40, 40), "constant", 0)
    np.testing.assert_array_equal(K.warp_window(spoiled, K.tap_windows(facts), 0, (40, 40), "constant", 0, None), K.warp_window(image, K.tap_windows(facts), 0, (40, 40), "constant", 0, None))
    assert np.abs(K.warp_window(image, K.tap_windows(facts), 0, (40, 40), "constant", 0, None).astype(int) - expected).max() <= 1


def test_tap_span_is_clipped_to_the_image():
    # A box from column 0: the bilinear taps of the first outputs leave the image (the border decides).
    assert _tap_span(0.0, 0.5, 20, 64) == (0, 12, False)
    # Shrinking by 2 from column 10: taps from 10 to 49, one pixel of margin each side.
    assert _tap_span(10.0, 2.0, 20, 64) == (9, 51, True)
    # The margin alone leaves the image: clipped, and the border mode is kept.
    assert _tap_span(1.0, 1.0, 62, 64) == (0, 64, False)
    assert _tap_span(60.0, 1.0, 10, 64) == (59, 64, False)


def test_no_window_when_the_taps_all_leave_the_image():
    """A box wholly outside the image: None, and the plain warp fills the output by the border mode."""
    image = noise(count=1, shape=(20, 20, 3))[0]
    inverse = np.array([[0.5, 0.0, 40.0], [0.0, 0.5, 2.0], [0.0, 0.0, 1.0]]) @ G.mirror_matrix(True, False, 16, 16)
    facts = axis_aligned([SamplePlan((20, 20, 3), (16, 16), inverse=inverse)])
    assert facts.aligned[0] and facts.flip_x[0]
    assert K.warp_window(image, K.tap_windows(facts), 0, (16, 16), "constant", 0, None) is None


@pytest.mark.parametrize("name", ["random_resized_crop", "random_resized_crop flipped"])
def test_the_backend_takes_the_window_path(name):
    """The albumentations backend runs scale + translation plans through warp_window."""
    images = noise(count=4)
    spec = {"ops": AXIS_ALIGNED[name]}
    plans = plans_for(spec, images)
    facts = axis_aligned(plans)
    out = pipelines.build(spec)(images, seed=3).numpy()
    for i, (image, plan) in enumerate(zip(images, plans)):
        np.testing.assert_array_equal(out[i], K.warp_window(image, K.tap_windows(facts), i, plan.out_hw, "constant", 0, None))


def test_no_fast_path_for_plans_that_are_not_axis_aligned():
    images = noise(count=4)
    plans = plans_for({"ops": [{"op": "rotate", "degrees": 20}]}, images)
    facts = axis_aligned(plans)
    assert not facts.aligned.any() and not facts.copies.any()


def test_nothing_to_read_is_no_error():
    K.read_into_cache(noise(count=1)[0], None)


@pytest.mark.parametrize("ops", [[{"op": "rotate", "degrees": 20}], [{"op": "warp", "kind": "grid"}]], ids=["affine", "local warp"])
def test_the_read_pass_leaves_the_image_and_the_output_alone(ops):
    """warp_affine and remap read their source box first; the pixels are those of the plain kernels."""
    images = noise(count=3)
    plans = plans_for({"ops": ops}, images)
    before = images.copy()
    for image, plan in zip(images, plans):
        if plan.inverse is not None:
            result = K.warp_affine(image, plan.inverse, plan.out_hw, "constant", 0)
            expected = cv2.warpAffine(image, G.to_pixel_center_inverse(plan.inverse)[:2], plan.out_hw[::-1], flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))
        else:
            result = K.remap(image, plan, "constant", 0)
            map_x, map_y = opencv_maps(plan)
            expected = cv2.remap(image, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))
        np.testing.assert_array_equal(result, expected)
    np.testing.assert_array_equal(images, before)


def bilinear_reference(image: np.ndarray, map_x: np.ndarray, map_y: np.ndarray) -> np.ndarray:
    """Float64 bilinear sampling at OpenCV coordinates (pixel centres on integers), zeros outside,
    rounded to uint8 levels."""
    height, width = image.shape[:2]
    x0, y0 = np.floor(map_x).astype(int), np.floor(map_y).astype(int)
    fx, fy = (map_x - x0)[..., None], (map_y - y0)[..., None]

    def tap(y, x):
        inside = ((y >= 0) & (y < height) & (x >= 0) & (x < width))[..., None]
        return image[np.clip(y, 0, height - 1), np.clip(x, 0, width - 1)].astype(np.float64) * inside

    value = tap(y0, x0) * (1 - fx) * (1 - fy) + tap(y0, x0 + 1) * fx * (1 - fy) + tap(y0 + 1, x0) * (1 - fx) * fy + tap(y0 + 1, x0 + 1) * fx * fy
    return np.clip(np.round(value), 0, 255)


def test_opencv_resamples_in_exact_float_bilinear():
    """What the kernels and the parity bounds rest on (pyproject asks for OpenCV >= 5): warpAffine and
    remap with float maps give float64 bilinear to the level (but for ties). OpenCV 4.14 snaps coordinates to 1/32 px
    and lands 0.86 levels off on average on this image, up to 4."""
    image = noise(count=1)[0]
    angle = np.radians(13.0)
    matrix = np.array([[np.cos(angle) * 0.77, -np.sin(angle) * 0.77, 9.3], [np.sin(angle) * 0.77, np.cos(angle) * 0.77, 4.1]])
    columns, rows = np.meshgrid(np.arange(48), np.arange(40))
    map_x, map_y = matrix[0, 0] * columns + matrix[0, 1] * rows + matrix[0, 2], matrix[1, 0] * columns + matrix[1, 1] * rows + matrix[1, 2]
    expected = bilinear_reference(image, map_x, map_y)
    warped = cv2.warpAffine(image, matrix, (48, 40), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_CONSTANT)
    remapped = cv2.remap(image, map_x.astype(np.float32), map_y.astype(np.float32), cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    for result in (warped, remapped):  # away from the border, where both treat half-outside taps alike
        difference = np.abs(result[2:-2, 2:-2] - expected[2:-2, 2:-2])
        assert difference.max() <= 1 and difference.mean() < 0.01, (difference.max(), difference.mean())  # ties round either way


def test_small_boxes_are_not_read_first(monkeypatch):
    """Under MIN_READ_PIXELS source pixels the pass costs more than it saves (a 32² rotated crop), so
    it is skipped; from there on one cv2.sumElems reads the box."""
    reads = []
    monkeypatch.setattr(K.cv2, "sumElems", lambda region: reads.append(region.shape))
    image = noise(count=1, shape=(256, 256, 3))[0]
    K.read_into_cache(image, (0.0, 0.0, 40.0, 40.0))  # (x0, y0, x1, y1): 1,600 pixels
    assert reads == []
    K.read_into_cache(image, (20.0, 10.0, 70.0, 60.0))  # 2,500 pixels
    assert reads == [(50, 50, 3)]
    angle = np.radians(10.0)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 100.0], [np.sin(angle), np.cos(angle), 90.0], [0.0, 0.0, 1.0]])
    K.warp_affine(image, rotation, (32, 32), "constant", 0)  # 1,024 source pixels: no pass
    assert len(reads) == 1
    K.warp_affine(image, rotation, (64, 64), "constant", 0)  # 4,096: one pass over the rotated box
    assert len(reads) == 2 and reads[1][0] > 64 and reads[1][1] > 64
