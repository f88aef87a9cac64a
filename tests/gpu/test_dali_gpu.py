"""The DALI backend on CUDA against its CPU build and the albumentations reference (same params).

GPU ``warp_affine`` uses the same float maths as the CPU build; local warps go through DALI's GPU-only
``experimental.remap`` (NPP) instead of OpenCV's ``cv2.remap``, so they get an interpolation tolerance.
Measured on an H200 (DALI 2.4): flips, windows, padding and color are byte-identical to both
references; every interpolated case is within 1 level (mean |diff| <= 0.0022).
"""

import cv2
import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

pytest.importorskip("nvidia.dali")

import pipelines  # noqa: E402
from pipelines.pipeline import as_uint8_numpy  # noqa: E402

MEAN_TOL = 0.1  # mean |gpu - reference| in uint8 levels
MAX_TOL = 2  # largest |gpu - reference|


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(7)
    smooth = [cv2.resize(rng.integers(0, 256, (8, 10, 3), dtype=np.uint8), (80, 64), interpolation=cv2.INTER_CUBIC) for _ in range(4)]
    noise = [rng.integers(0, 256, (64, 80, 3), dtype=np.uint8) for _ in range(4)]
    return np.stack(smooth + noise)


CASES = {
    # name: (spec, exact against the CPU build of DALI)
    "mirror": ({"ops": [{"op": "mirror", "horizontal": 0.5, "vertical": 0.5}]}, True),
    "crop_padding": ({"ops": [{"op": "random_crop", "size": 60, "padding": 8}]}, True),
    "color": ({"ops": [{"op": "pca_color", "alpha_std": 0.5}, {"op": "color_shift", "limit": 30}]}, True),
    "rotate": ({"ops": [{"op": "rotate", "degrees": 30}]}, False),
    "random_resized_crop": ({"ops": [{"op": "random_resized_crop", "size": 48}, {"op": "mirror"}]}, False),
    "resize": ({"ops": [{"op": "resize", "short_side": 100}, {"op": "center_crop", "size": 90}]}, False),
    "replicate": ({"ops": [{"op": "rotate", "degrees": 40}], "border": "replicate"}, False),
    "fill": ({"ops": [{"op": "rotate", "degrees": 40}, {"op": "color_shift", "limit": 30}], "fill": 128}, False),
    "warp_grid": ({"ops": [{"op": "warp", "kind": "grid", "magnitude": 0.05}]}, False),
    "warp_elastic_crop": ({"ops": [{"op": "warp", "magnitude": 0.03}, {"op": "random_crop", "size": 48}]}, False),
    "warp_grows": ({"ops": [{"op": "warp", "magnitude": 0.03}, {"op": "resize", "short_side": 96}]}, False),
    "warp_fill": ({"ops": [{"op": "rotate", "degrees": 30}, {"op": "warp", "magnitude": 0.05}], "fill": 77}, False),
    "warp_replicate": ({"ops": [{"op": "rotate", "degrees": 30}, {"op": "warp", "magnitude": 0.05}], "border": "replicate"}, False),
    "color_first_warp": ({"ops": [{"op": "color_shift", "limit": 30}, {"op": "warp", "magnitude": 0.04, "p": 0.5}]}, False),
}


def close(out, ref, exact):
    assert out.shape == ref.shape
    if exact:
        np.testing.assert_array_equal(out, ref)
        return
    diff = np.abs(out.astype(np.int16) - ref.astype(np.int16))
    assert diff.mean() < MEAN_TOL and diff.max() <= MAX_TOL, f"mean {diff.mean():.4f}, max {diff.max()}"


@pytest.mark.parametrize("name", list(CASES))
def test_gpu_matches_cpu_builds(images, name):
    spec, exact = CASES[name]
    out = pipelines.build(spec, backend="dali", device="cuda")(images, seed=5)
    assert out.device.type == "cuda" and out.dtype == torch.uint8
    gpu = as_uint8_numpy(out)
    close(gpu, as_uint8_numpy(pipelines.build(spec, backend="dali")(images, seed=5)), exact)
    close(gpu, as_uint8_numpy(pipelines.build(spec, backend="albumentations")(images, seed=5)), False)


def test_gpu_lenet5_grey_with_normalize():
    rng = np.random.default_rng(12)
    batch = np.stack([cv2.resize(rng.integers(0, 256, (6, 6), dtype=np.uint8), (32, 32)) for _ in range(8)])
    out = pipelines.build("lenet5", backend="dali", device="cuda")(batch, seed=2)
    ref = pipelines.build("lenet5", backend="albumentations")(batch, seed=2)
    assert out.is_cuda and out.shape == (8, 1, 32, 32)
    assert (out.cpu() - ref).abs().max().item() <= MAX_TOL / (255 * 0.36) + 1e-5


def test_gpu_mixed_sizes_come_back_as_a_list_on_cuda():
    rng = np.random.default_rng(14)
    shapes = [(64, 80, 3), (50, 50, 3), (90, 60, 3)]
    batch = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in shapes]
    spec = {"ops": [{"op": "rotate", "degrees": 20}, {"op": "warp", "magnitude": 0.03, "p": 0.5}]}
    out = pipelines.build(spec, backend="dali", device="cuda")(batch, seed=4)
    ref = pipelines.build(spec, backend="dali")(batch, seed=4)
    assert isinstance(out, list) and all(o.is_cuda for o in out)
    for o, r in zip(out, ref):
        close(o.cpu().numpy(), r.numpy(), False)


def test_gpu_determinism_and_batch_independence(images):
    spec = {"ops": [{"op": "random_resized_crop", "size": 48}, {"op": "mirror"}, {"op": "warp", "p": 0.5}, {"op": "pca_color"}]}
    pipe = pipelines.build(spec, backend="dali", device="cuda")
    ids = list(range(20, 28))
    full = as_uint8_numpy(pipe(images, seed=9, sample_ids=ids))
    assert full.tobytes() == as_uint8_numpy(pipe(images, seed=9, sample_ids=ids)).tobytes()
    alone = as_uint8_numpy(pipe(images[5:6], seed=9, sample_ids=[25]))
    assert alone[0].tobytes() == full[5].tobytes()
