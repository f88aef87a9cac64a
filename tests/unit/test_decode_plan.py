"""Plan-aware decoding, pipeline side: which region and reduction a plan asks for, and that the plan
re-aimed at a decoded region keeps its geometry."""

import math

import cv2
import numpy as np
import pytest

import pipelines
from pipelines.decode_plan import affine_source_box, affine_source_boxes, clipped_box, largest_reduction, reaim, source_box
from pipelines.plan import SamplePlan
from pipelines.source_map import source_map


def smooth(height=300, width=400, seed=0, cell=25):
    """A smooth RGB picture (bilinear upsampling of coarse noise): reductions change it little."""
    coarse = np.random.default_rng(seed).integers(0, 256, (height // cell, width // cell, 3), dtype=np.uint8)
    return cv2.resize(coarse, (width, height), interpolation=cv2.INTER_LINEAR)


def region_decoder(images, log=None):
    """A stand-in for a JPEG decoder: keeps the box (rounded out to multiples of the factor) of the
    picture area-averaged by ``factor`` — what DCT scaling approximates."""

    def decode(index, box, max_factor):
        image = images[index]
        height, width = image.shape[:2]
        factor = max_factor
        x0, y0, x1, y1 = (0, 0, width, height) if box is None else box
        left, top = int(x0) // factor * factor, int(y0) // factor * factor
        right, bottom = min(width, math.ceil(x1 / factor) * factor), min(height, math.ceil(y1 / factor) * factor)
        region = image[top:bottom, left:right]
        if factor > 1:
            region = cv2.resize(region, ((right - left) // factor, (bottom - top) // factor), interpolation=cv2.INTER_AREA)
        if log is not None:
            log.append((index, box, max_factor, region.shape))
        return np.ascontiguousarray(region), (factor, top, left)

    return decode


def test_exact_decoding_is_byte_identical_to_decoding_first():
    images = [smooth(seed=s) for s in range(4)]
    spec = {"ops": [{"op": "random_resized_crop", "size": 64}, {"op": "mirror"}], "decode": "exact"}
    pipe = pipelines.build(spec)
    log = []
    out = pipe.run_decoding([i.shape for i in images], region_decoder(images, log), seed=5, sample_ids=range(4))
    np.testing.assert_array_equal(out.numpy(), pipe(images, seed=5, sample_ids=range(4)).numpy())
    assert all(box is None and factor == 1 for _, box, factor, _ in log)


def test_fast_decoding_keeps_the_geometry():
    """Same samples, same geometry: the fast output differs from the exact one only by what the
    reduction averages (little on a picture smooth at the output's scale; a shifted or scaled
    geometry would differ by tens of levels), and decodes far fewer pixels."""
    images = [smooth(900, 1200, seed=s, cell=150) for s in range(6)]
    spec = {"ops": [{"op": "random_resized_crop", "size": 64, "scale": [0.3, 1.0]}, {"op": "mirror"}]}
    fast, exact = pipelines.build(spec), pipelines.build({**spec, "decode": "exact"})
    log = []
    shapes = [i.shape for i in images]
    out = fast.run_decoding(shapes, region_decoder(images, log), seed=1, sample_ids=range(6)).numpy().astype(int)
    ref = exact.run_decoding(shapes, region_decoder(images), seed=1, sample_ids=range(6)).numpy().astype(int)
    assert np.abs(out - ref).mean() < 1.0
    assert all(factor >= 4 for _, _, factor, _ in log)  # 1200×900 boxes of ≥ 30% area → 64²: ≥ 4×
    decoded = sum(np.prod(shape[:2]) for *_, shape in log)
    assert decoded < 0.1 * sum(h * w for h, w, _ in shapes)


def test_full_resolution_region_gives_the_same_bytes():
    """At factor 1 the region goes back on a canvas of the image's size and the plan runs unchanged:
    the same bytes as decoding the whole image (re-aiming the matrix instead would flip a few
    roundings of the warp)."""
    images = [smooth(seed=s) for s in range(4)]
    spec = {"ops": [{"op": "resize", "short_side": 320}, {"op": "random_crop", "size": 64}, {"op": "rotate", "degrees": 10}]}
    pipe = pipelines.build(spec)

    log = []

    def full_resolution(index, box, max_factor):
        log.append(box)
        return region_decoder(images)(index, box, 1)

    out = pipe.run_decoding([i.shape for i in images], full_resolution, seed=2, sample_ids=range(4))
    np.testing.assert_array_equal(out.numpy(), pipe(images, seed=2, sample_ids=range(4)).numpy())
    assert all(box is not None for box in log)  # regions were asked for, not whole images


def plan(inverse, in_shape=(100, 200, 3), out_hw=(10, 20)):
    return SamplePlan(in_shape, out_hw, inverse=np.asarray(inverse, dtype=float))


def test_source_box_covers_the_taps_and_is_clipped():
    p = plan([[2.0, 0, 30], [0, 3.0, 40], [0, 0, 1]])
    assert source_box(p) == (29.0, 39.0, 71.0, 71.0)
    assert source_box(plan([[2.0, 0, -5], [0, 2.0, 90], [0, 0, 1]])) == (0.0, 89.0, 36.0, 100.0)
    assert source_box(plan([[1.0, 0, 500], [0, 1.0, 0], [0, 0, 1]])) is None  # entirely outside


def test_source_box_holds_every_tap_of_rotated_and_sheared_plans():
    """Every pixel the bilinear taps read (the dense float64 source map, taps floor(x - 0.5) and the
    next) lies in the box, as the OpenCV kernels' read pass slices it (floor and ceiling of its ends)."""
    shapes = [(64, 80, 3)] * 6
    pipe = pipelines.build({"ops": [{"op": "rotate", "degrees": 30}, {"op": "shear", "degrees": 10}, {"op": "random_crop", "size": 48}]})
    for p in pipe.plans(pipe.sample_params(shapes, seed=3)):
        x0, y0, x1, y1 = source_box(p)
        map_x, map_y = source_map(p, dtype=np.float64)
        tap_x, tap_y = np.floor(map_x - 0.5), np.floor(map_y - 0.5)
        inside_x, inside_y = (tap_x >= 0) & (tap_x + 1 < 80), (tap_y >= 0) & (tap_y + 1 < 64)
        assert math.floor(x0) <= tap_x[inside_x].min() and tap_x[inside_x].max() + 1 < math.ceil(x1)
        assert math.floor(y0) <= tap_y[inside_y].min() and tap_y[inside_y].max() + 1 < math.ceil(y1)


def test_clipped_box_is_clipped_and_none_when_empty_or_not_finite():
    assert clipped_box((10.2, 30.7), (-5.0, 70.0), (64, 80)) == (9.2, 0.0, 31.7, 64.0)
    assert clipped_box((100.0, 120.0), (0.0, 10.0), (64, 80)) is None  # right of the image
    assert clipped_box((float("nan"), 3.0), (0.0, 10.0), (64, 80)) is None
    assert clipped_box((0.0, 3.0), (0.0, float("inf")), (64, 80)) is None


def test_the_batch_of_boxes_is_each_samples_box_to_the_bit():
    """``affine_source_boxes`` (a batch planned on a device) gives exactly ``affine_source_box`` of each
    sample: random maps, boxes clipped on every side, outside the image, and non-finite matrices."""
    rng = np.random.default_rng(2)
    n = 400
    inverse = np.zeros((n, 3, 3))
    inverse[:, :2, :2] = rng.normal(0.0, 1.5, (n, 2, 2))
    inverse[:, :2, 2] = rng.uniform(-200.0, 300.0, (n, 2))
    inverse[:, 2, 2] = 1.0
    inverse[7, 0, 0], inverse[8, 1, 2], inverse[9, 0, 1] = np.nan, np.inf, -np.inf
    inverse[10], inverse[11] = np.eye(3), np.eye(3)
    inverse[10, 0, 1], inverse[11, 1, 0] = np.nan, np.nan  # NaN in a corner that is not the first: inside the image otherwise
    out_hw = rng.integers(1, 300, (n, 2))
    in_hw = rng.integers(1, 400, (n, 2))
    out_hw[10:12], in_hw[10:12] = 10, 100
    boxes = affine_source_boxes(inverse, out_hw, in_hw)
    expected = [affine_source_box(inverse[k], tuple(out_hw[k].tolist()), tuple(in_hw[k].tolist())) for k in range(n)]
    assert boxes == expected
    assert sum(box is None for box in boxes) > 100 and sum(box is not None for box in boxes) > 100  # both kinds, many times
    assert boxes[7] is boxes[8] is boxes[9] is boxes[10] is boxes[11] is None


@pytest.mark.parametrize(
    "inverse, factor",
    [
        ([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1]], 1),
        ([[2.5, 0, 0], [0, 9.0, 0], [0, 0, 1]], 2),  # the less reduced axis decides
        ([[8.0, 0, 0], [0, 8.0, 0], [0, 0, 1]], 8),
        ([[0.5, 0, 0], [0, 0.5, 0], [0, 0, 1]], 1),  # enlarging: never reduced
        ([[-4.0, 0, 0], [0, 4.0, 0], [0, 0, 1]], 4),  # mirrored
    ],
)
def test_largest_reduction(inverse, factor):
    assert largest_reduction(plan(inverse)) == factor


def test_largest_reduction_of_a_rotation_uses_the_least_stretched_direction():
    angle = math.radians(30)
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    linear = rotation @ np.diag([5.0, 3.0])
    inverse = np.eye(3)
    inverse[:2, :2] = linear
    assert largest_reduction(plan(inverse)) == 2


def test_reaim_maps_the_same_points():
    p = plan([[3.0, 0.5, 10], [0.2, 4.0, 20], [0, 0, 1]])
    moved = reaim(p, 4, 16, 8, (30, 40, 3))
    assert moved.in_shape == (30, 40, 3) and moved.out_hw == p.out_hw
    for point in ([0, 0, 1], [5.5, 7.25, 1], [20, 10, 1]):
        source = p.inverse @ point
        array = moved.inverse @ point
        np.testing.assert_allclose(array[:2], (source[:2] - [8, 16]) / 4)


def test_backends_that_read_whole_images_get_the_plan_re_aimed_instead():
    """The torch backend converts whole images, so a region is not put back on a canvas: the plan
    is re-aimed at it (same geometry; a level of rounding at most)."""
    images = [smooth(seed=s) for s in range(4)]
    spec = {"ops": [{"op": "random_resized_crop", "size": 48}, {"op": "mirror"}]}
    pipe = pipelines.build(spec, backend="torch")
    assert not pipe.backend.reads_only_sampled_pixels and pipelines.build(spec).backend.reads_only_sampled_pixels
    shapes = []

    def full_resolution(index, box, max_factor):
        region, placement = region_decoder(images)(index, box, 1)
        shapes.append(region.shape)
        return region, placement

    out = pipe.run_decoding([i.shape for i in images], full_resolution, seed=2, sample_ids=range(4)).numpy().astype(int)
    diff = np.abs(out - pipe(images, seed=2, sample_ids=range(4)).numpy().astype(int))
    assert diff.max() <= 1 and diff.mean() < 0.02
    assert all(shape[:2] != (300, 400) for shape in shapes)  # regions, not whole images
