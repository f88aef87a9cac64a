"""Distribution checks of the parameter sampling (statistical: thousands of draws, loose bounds)."""

import math

import numpy as np
import pytest

import pipelines


def records(spec, n=4000, shape=(256, 256, 3), seed=0):
    pipe = pipelines.build(spec)
    return [r.ops for r in pipe.sample_params([shape] * n, seed=seed, sample_ids=range(n))]


def test_random_resized_crop_area_fraction_stays_within_scale():
    ops = records({"ops": [{"op": "random_resized_crop", "size": 224, "scale": [0.2, 0.6], "ratio": [0.75, 1.3333333]}]})
    heights = np.array([o[0]["height"] for o in ops], dtype=float)
    widths = np.array([o[0]["width"] for o in ops], dtype=float)
    fractions = heights * widths / 256**2
    # Whole-pixel boxes (as torchvision cuts them): each side is rounded, so area and aspect may leave
    # their ranges by at most what half a pixel on each side allows.
    slack = (0.5 * (heights + widths) + 0.25) / 256**2
    assert np.all(fractions >= 0.2 - slack) and np.all(fractions <= 0.6 + slack)
    aspects = widths / heights
    aspect_slack = 0.5 / heights + 0.5 * widths / heights**2 + 1e-9
    assert np.all(aspects >= 0.75 - aspect_slack) and np.all(aspects <= 1.3333333 + aspect_slack)
    # Uniform in [0.2, 0.6]: mean 0.4, and each fifth of the range gets about a fifth of the draws.
    assert abs(fractions.mean() - 0.4) < 0.01
    counts, _ = np.histogram(fractions, bins=5, range=(0.2, 0.6))
    assert counts.min() > 0.15 * len(fractions)
    # Boxes are whole pixels inside the image, and every position of a box is drawn.
    for o in ops:
        r = o[0]
        assert all(isinstance(r[k], int) for k in ("top", "left", "height", "width"))
        assert r["top"] >= 0 and r["left"] >= 0 and r["top"] + r["height"] <= 256 and r["left"] + r["width"] <= 256
    small = records({"ops": [{"op": "random_resized_crop", "size": 8, "scale": [0.25, 0.25], "ratio": [1.0, 1.0]}]}, n=2000, shape=(4, 4, 3))
    assert {(o[0]["top"], o[0]["left"]) for o in small} == {(t, l) for t in range(3) for l in range(3)}


def test_random_resized_crop_falls_back_to_a_centred_box_on_extreme_aspect():
    ops = records({"ops": [{"op": "random_resized_crop", "size": 32, "scale": [0.9, 1.0], "ratio": [1.0, 1.0]}]}, n=50, shape=(20, 400, 3))
    r = ops[0][0]
    assert r["height"] == 20 and r["width"] == 20 and r["left"] == pytest.approx(190)


def test_rotation_angles_are_uniform_within_degrees():
    ops = records({"ops": [{"op": "rotate", "degrees": 15, "p": 1.0}]})
    angles = np.array([o[0]["angle"] for o in ops])
    assert angles.min() >= -15 and angles.max() <= 15
    assert abs(angles.mean()) < 0.5 and abs(angles.std() - 30 / math.sqrt(12)) < 0.3
    counts, _ = np.histogram(angles, bins=6, range=(-15, 15))
    assert counts.min() > 0.8 * len(angles) / 6


def test_probabilities_are_respected():
    ops = records({"ops": [{"op": "rotate", "degrees": 5, "p": 0.3}, {"op": "mirror", "horizontal": 0.5, "vertical": 0.1}]})
    applied = np.mean([o[0]["applied"] for o in ops])
    horizontal = np.mean([o[1]["horizontal"] for o in ops])
    vertical = np.mean([o[1]["vertical"] for o in ops])
    assert abs(applied - 0.3) < 0.03 and abs(horizontal - 0.5) < 0.03 and abs(vertical - 0.1) < 0.02


def test_pca_alpha_is_gaussian_with_alpha_std():
    ops = records({"ops": [{"op": "pca_color", "alpha_std": 0.1}]})
    alphas = np.array([o[0]["alpha"] for o in ops])
    assert np.all(np.abs(alphas.mean(0)) < 0.01)
    np.testing.assert_allclose(alphas.std(0), 0.1, rtol=0.06)


def test_color_shift_limits_per_channel():
    ops = records({"ops": [{"op": "color_shift", "limit": 10, "b": 40}]})
    offsets = np.array([o[0]["offset"] for o in ops])
    assert np.abs(offsets[:, :2]).max() <= 10 and np.abs(offsets[:, 2]).max() <= 40
    assert np.abs(offsets[:, 2]).max() > 38


def test_vgg_scale_jitter_short_side_range():
    ops = records({"ops": [{"op": "resize", "short_side": [256, 512]}]}, n=2000, shape=(300, 400, 3))
    sides = np.array([o[0]["height"] for o in ops])
    assert sides.min() == 256 and sides.max() == 512
    widths = np.array([o[0]["width"] for o in ops])
    np.testing.assert_allclose(widths / sides, 400 / 300, atol=0.01)


@pytest.mark.parametrize("kind", ["grid", "elastic"])
def test_warp_controls_are_bounded_and_pin_the_border(kind):
    ops = records({"ops": [{"op": "warp", "kind": kind, "magnitude": 0.05, "cells": 4}]}, n=500)
    control = np.array([o[0]["control"] for o in ops])
    assert control.shape == (500, 5, 5, 2)
    assert np.all(control[:, 0] == 0) and np.all(control[:, -1] == 0) and np.all(control[:, :, 0] == 0)
    interior = control[:, 1:-1, 1:-1]
    bound = (0.05 if kind == "grid" else 3 * 0.05) + 1e-12  # elastic draws are clipped at 3 std
    assert np.abs(interior).max() <= bound
    assert abs(interior.std() - (0.05 / math.sqrt(3) if kind == "grid" else 0.05)) < 0.005
