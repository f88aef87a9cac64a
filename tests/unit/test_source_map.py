"""Dense source maps of warp chains: the separable path (an axis-aligned grid of points reaches the warp)
equals the general one, the general path still handles rotations and shears after the warp, and the
OpenCV maps are the source map shifted to integer pixel centres.

The reference below evaluates a chain point by point with the textbook basis functions (hat, cubic
B-spline), independently of :mod:`pipelines.geometry`'s vectorised code.
"""

import numpy as np
import pytest
import torch

import pipelines
from pipelines import geometry as G
from pipelines import source_map as S
from pipelines.plan import AffineStep, SamplePlan, WarpStep
from pipelines.source_map import opencv_maps, source_map

KINDS = ("grid", "elastic")


def textbook_weights(u: np.ndarray, count: int, kind: str) -> np.ndarray:
    """(P, count) weights of knots -1 … count-2 at positions ``u`` (P,), by cases."""
    d = np.abs(u[:, None] - np.arange(-1, count - 1))
    if kind == "grid":
        return np.where(d < 1, 1 - d, 0.0)
    return np.where(d < 1, (4 - 6 * d**2 + 3 * d**3) / 6, np.where(d < 2, (2 - d) ** 3 / 6, 0.0))


def reference_map(plan: SamplePlan) -> tuple[np.ndarray, np.ndarray]:
    """float64 (out_h, out_w) source coordinates: each step of the chain applied to every point."""
    out_h, out_w = plan.out_hw
    x, y = (a.copy().ravel() for a in G.pixel_centers(out_h, out_w))
    for step in plan.chain:
        if isinstance(step, AffineStep):
            m = step.inverse
            x, y = m[0, 0] * x + m[0, 1] * y + m[0, 2], m[1, 0] * x + m[1, 1] * y + m[1, 2]
        else:
            cells = step.control.shape[0] - 1
            extended = G.extend_control(step.control) * min(step.height, step.width)
            wy = textbook_weights(y * cells / step.height, cells + 3, step.kind)
            wx = textbook_weights(x * cells / step.width, cells + 3, step.kind)
            field = np.einsum("pk,klc,pl->pc", wy, extended, wx)
            x, y = x + field[:, 0], y + field[:, 1]
    return x.reshape(out_h, out_w), y.reshape(out_h, out_w)


def random_control(rng, cells: int, magnitude: float = 0.05) -> np.ndarray:
    control = rng.uniform(-magnitude, magnitude, size=(cells + 1, cells + 1, 2))
    control[0], control[-1], control[:, 0], control[:, -1] = 0.0, 0.0, 0.0, 0.0
    return control


def warp_plan(rng, kind, cells, canvas, into_warp=None, out_of_warp=None, out_hw=None) -> SamplePlan:
    """A plan input → ``into_warp`` (forward matrix onto the warp canvas) → warp → ``out_of_warp``
    (forward matrix onto the output) → output. The chain runs destination → source, so
    ``out_of_warp`` is the piece the destination pixel centres meet first."""
    height, width = canvas
    into_warp = np.eye(3) if into_warp is None else into_warp
    out_of_warp = np.eye(3) if out_of_warp is None else out_of_warp
    chain = [AffineStep(np.linalg.inv(out_of_warp)), WarpStep(random_control(rng, cells), kind, height, width), AffineStep(np.linalg.inv(into_warp))]
    return SamplePlan((height, width, 3), out_hw or canvas, chain=chain)


@pytest.fixture
def general_path_refused(monkeypatch):
    """Fails any per-point warp evaluation: the map must come from the separable factors."""

    def refuse(*args, **kwargs):
        raise AssertionError("the general (per-point) warp path ran on an axis-aligned chain")

    monkeypatch.setattr(S.G, "warp_displacement", refuse)


# Axis-aligned pieces between the warp and the output (forward matrix on a 48×36 warp canvas, output
# size): destination pixel centres pass through them and still form an axis-aligned grid.
OUT_OF_WARP = {
    "none": (None, (48, 36)),
    "crop": (G.crop_matrix(5, 7), (30, 24)),
    "resize": (G.scaling(0.75, 1.5), (72, 27)),
    "resized_crop": (G.resized_crop_matrix(3.25, 6.5, 40.0, 30.0, 50, 20), (50, 20)),
    "flip": (G.mirror_matrix(True, True, 48, 36), (48, 36)),
    "crop_flip": (G.mirror_matrix(True, False, 40, 30) @ G.crop_matrix(6, 2), (40, 30)),
}
# Pieces between the input and the warp: whatever they are, they fold into the separable product.
INTO_WARP = {"none": None, "resize": G.scaling(2.0, 0.5), "rotate": G.rotation_matrix(20, 48, 36)}


@pytest.mark.usefixtures("general_path_refused")
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("cells", [2, 5])
@pytest.mark.parametrize("out_of_warp", sorted(OUT_OF_WARP))
@pytest.mark.parametrize("into_warp", sorted(INTO_WARP))
def test_separable_path_equals_the_pointwise_field(kind, cells, out_of_warp, into_warp):
    rng = np.random.default_rng(cells)
    matrix, out_hw = OUT_OF_WARP[out_of_warp]
    plan = warp_plan(rng, kind, cells, (48, 36), into_warp=INTO_WARP[into_warp], out_of_warp=matrix, out_hw=out_hw)
    x, y = source_map(plan, dtype=np.float64)
    ref_x, ref_y = reference_map(plan)
    assert x.dtype == np.float64 and x.shape == out_hw
    np.testing.assert_allclose(x, ref_x, rtol=0, atol=1e-9)
    np.testing.assert_allclose(y, ref_y, rtol=0, atol=1e-9)


@pytest.mark.usefixtures("general_path_refused")
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("canvas,cells", [((17, 23), 2), ((64, 64), 4), ((31, 97), 9), ((90, 120), 32)])
def test_separable_path_on_several_canvases(kind, canvas, cells):
    rng = np.random.default_rng(canvas[0])
    plan = warp_plan(rng, kind, cells, canvas, into_warp=G.crop_matrix(-3, 4))
    x, y = source_map(plan, dtype=np.float64)
    ref_x, ref_y = reference_map(plan)
    np.testing.assert_allclose(x, ref_x, rtol=0, atol=1e-9)
    np.testing.assert_allclose(y, ref_y, rtol=0, atol=1e-9)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("canvas,cells", [((17, 23), 2), ((48, 36), 5), ((64, 80), 12)])
@pytest.mark.parametrize("out_of_warp", ["none", "resized_crop", "crop_flip"])
def test_separable_path_equals_the_general_path(monkeypatch, kind, canvas, cells, out_of_warp):
    """The same plan through both paths of :func:`source_map`: the general one forced by declaring no
    piece axis-aligned."""
    rng = np.random.default_rng(cells)
    matrix, out_hw = OUT_OF_WARP[out_of_warp]
    plan = warp_plan(rng, kind, cells, canvas, into_warp=G.scaling(canvas[1] / 36, canvas[0] / 48) @ INTO_WARP["rotate"], out_of_warp=matrix, out_hw=out_hw)
    separable = [source_map(plan, dtype=np.float64), source_map(plan), opencv_maps(plan)]
    monkeypatch.setattr(S, "_axis_aligned", lambda inverse: False)
    general = [source_map(plan, dtype=np.float64), source_map(plan), opencv_maps(plan)]
    for (sx, sy), (gx, gy), atol in zip(separable, general, (1e-9, 1e-4, 1e-4)):
        np.testing.assert_allclose(sx, gx, rtol=0, atol=atol)
        np.testing.assert_allclose(sy, gy, rtol=0, atol=atol)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("piece", ["rotate", "shear", "tiny_rotation"])
def test_general_path_handles_rotation_after_the_warp(monkeypatch, kind, piece):
    """A rotation or shear applied after the warp turns the grid of destination points before the
    warp sees it: the per-point path runs (even for a tiny angle: only exact zeros count as aligned)."""
    calls = []
    real = S.G.warp_displacement
    monkeypatch.setattr(S.G, "warp_displacement", lambda *a, **k: calls.append(1) or real(*a, **k))
    rng = np.random.default_rng(5)
    out_of_warp = {"rotate": G.rotation_matrix(30, 40, 50), "shear": G.shear_matrix(12, 0, 40, 50), "tiny_rotation": G.rotation_matrix(1e-6, 40, 50)}[piece]
    plan = warp_plan(rng, kind, 4, (40, 50), out_of_warp=out_of_warp)
    x, y = source_map(plan, dtype=np.float64)
    ref_x, ref_y = reference_map(plan)
    assert calls
    np.testing.assert_allclose(x, ref_x, rtol=0, atol=1e-9)
    np.testing.assert_allclose(y, ref_y, rtol=0, atol=1e-9)
    x32, y32 = source_map(plan)
    np.testing.assert_allclose(x32, ref_x, rtol=0, atol=1e-4)
    np.testing.assert_allclose(y32, ref_y, rtol=0, atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_two_warps_chain_separable_then_general(kind):
    rng = np.random.default_rng(9)
    first = WarpStep(random_control(rng, 3), kind, 30, 40)
    second = WarpStep(random_control(rng, 5), kind, 30, 40)
    chain = [AffineStep(np.linalg.inv(G.crop_matrix(2, 3))), first, AffineStep(np.linalg.inv(G.rotation_matrix(15, 30, 40))), second, AffineStep(np.eye(3))]
    plan = SamplePlan((30, 40, 3), (26, 34), chain=chain)
    x, y = source_map(plan, dtype=np.float64)
    ref_x, ref_y = reference_map(plan)
    np.testing.assert_allclose(x, ref_x, rtol=0, atol=1e-9)
    np.testing.assert_allclose(y, ref_y, rtol=0, atol=1e-9)


SPECS = {
    "warp": [{"op": "warp", "kind": "grid", "magnitude": 0.05}],
    "resize_crop_flip_warp": [
        {"op": "resize", "short_side": 50},
        {"op": "random_crop", "size": [40, 44], "padding": 3},
        {"op": "mirror", "horizontal": 0.5, "vertical": 0.5},
        {"op": "warp", "kind": "elastic", "magnitude": 0.04, "cells": 5},
    ],
    "warp_then_resized_crop": [{"op": "warp", "kind": "grid", "cells": 3}, {"op": "random_resized_crop", "size": [36, 30]}],
    "rotate_warp_crop": [{"op": "rotate", "degrees": 20}, {"op": "warp", "kind": "elastic"}, {"op": "center_crop", "size": 40}],
    "warp_rotate": [{"op": "warp", "kind": "elastic"}, {"op": "rotate", "degrees": 20}],
}


@pytest.mark.parametrize("name", sorted(SPECS))
def test_plans_of_real_pipelines(name):
    pipe = pipelines.build({"ops": SPECS[name]})
    plans = pipe.plans(pipe.sample_params([(64, 80, 3), (70, 56, 3), (64, 80, 3)], seed=3))
    warped = [plan for plan in plans if plan.chain is not None]
    assert warped
    for plan in warped:
        ref_x, ref_y = reference_map(plan)
        x, y = source_map(plan, dtype=np.float64)
        np.testing.assert_allclose(x, ref_x, rtol=0, atol=1e-9)
        np.testing.assert_allclose(y, ref_y, rtol=0, atol=1e-9)
        x32, y32 = source_map(plan)
        assert x32.dtype == np.float32 and x32.flags.c_contiguous and x32.flags.writeable
        np.testing.assert_allclose(x32, ref_x, rtol=0, atol=1e-4)
        np.testing.assert_allclose(y32, ref_y, rtol=0, atol=1e-4)
        tx, ty = source_map(plan, device="cpu")
        assert tx.dtype == torch.float64
        np.testing.assert_allclose(tx.numpy(), x, rtol=0, atol=1e-12)
        np.testing.assert_allclose(ty.numpy(), y, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_opencv_maps_are_the_source_map_on_integer_centres(name):
    pipe = pipelines.build({"ops": SPECS[name]})
    for plan in pipe.plans(pipe.sample_params([(64, 80, 3)] * 2, seed=4)):
        if plan.chain is None:
            continue
        map_x, map_y = opencv_maps(plan)
        x, y = source_map(plan, dtype=np.float64)
        assert map_x.dtype == np.float32 and map_x.shape == plan.out_hw and map_x.flags.c_contiguous and map_y.flags.c_contiguous
        np.testing.assert_allclose(map_x, x - 0.5, rtol=0, atol=1e-4)
        np.testing.assert_allclose(map_y, y - 0.5, rtol=0, atol=1e-4)


def test_maps_are_deterministic_whatever_the_cache_holds():
    """The per-shape half of the product is cached: a hit, a miss and a run after other shapes give
    the same bytes."""
    rng = np.random.default_rng(2)
    plan = warp_plan(rng, "elastic", 4, (40, 50), out_of_warp=G.crop_matrix(1, 2), out_hw=(30, 40))
    S._grid_side.cache_clear()
    first = [a.copy() for a in (*opencv_maps(plan), *source_map(plan), *source_map(plan, dtype=np.float64))]
    for cells in (2, 3, 6):  # other shapes in between
        source_map(warp_plan(rng, "grid", cells, (33, 47)))
    again = [*opencv_maps(plan), *source_map(plan), *source_map(plan, dtype=np.float64)]
    S._grid_side.cache_clear()
    fresh = [*opencv_maps(plan), *source_map(plan), *source_map(plan, dtype=np.float64)]
    for a, b, c in zip(first, again, fresh):
        assert a.tobytes() == b.tobytes() == c.tobytes()


def test_writing_into_a_map_leaves_the_next_one_alone():
    rng = np.random.default_rng(3)
    plan = warp_plan(rng, "grid", 4, (24, 32))
    map_x, map_y = opencv_maps(plan)
    expected = map_x.copy()
    map_x += 100.0
    map_y[:] = 0.0
    np.testing.assert_array_equal(opencv_maps(plan)[0], expected)


@pytest.mark.parametrize("kind", KINDS)
def test_batched_warp_factors_pair_each_sample_with_its_controls(kind):
    rng = np.random.default_rng(6)
    controls = np.stack([random_control(rng, 4) for _ in range(3)])
    xs = torch.as_tensor(rng.uniform(0, 40, size=(3, 7)))
    ys = torch.as_tensor(rng.uniform(0, 30, size=(3, 5)))
    wy, wx, extended = G.warp_factors(xs, ys, torch.as_tensor(controls), kind, 30, 40)
    dx = wy @ extended[..., 0] @ wx.transpose(-1, -2)  # (3, 5, 7)
    for b in range(3):
        px, py = np.meshgrid(xs[b].numpy(), ys[b].numpy())
        ex, _ = G.warp_displacement(px, py, controls[b], kind, 30, 40)
        np.testing.assert_allclose(dx[b].numpy(), ex, rtol=0, atol=1e-12)
