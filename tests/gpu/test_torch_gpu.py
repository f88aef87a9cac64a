"""The torch backend on CUDA against its CPU run and the albumentations reference (same params).

CPU and CUDA run the same float32 maths (grid build, ``grid_sample``, color); they may round a value
on a .5 boundary differently (FMA, different instruction order), so interpolated outputs get a one-level
tolerance. Pixel copies and color-only chains are exact.
"""

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

import pipelines  # noqa: E402
from pipelines.pipeline import as_uint8_numpy  # noqa: E402

MEAN_TOL = 0.05  # mean |a - b| in uint8 levels
MAX_TOL = 2  # largest |a - b|


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(7)
    coarse = rng.integers(0, 256, (4, 8, 10, 3)).astype(np.float64)
    smooth = np.kron(coarse, np.ones((8, 8, 1)))  # 64×80 blocks: flat areas and sharp edges
    noise = rng.integers(0, 256, (4, 64, 80, 3))
    return np.concatenate([smooth, noise]).astype(np.uint8)


CASES = {
    # name: (spec, exact between CPU and CUDA)
    "mirror": ({"ops": [{"op": "mirror", "horizontal": 0.5, "vertical": 0.5}]}, True),
    "crop_padding_fill": ({"ops": [{"op": "random_crop", "size": 60, "padding": 8}, {"op": "mirror"}], "fill": 77}, True),
    "color": ({"ops": [{"op": "pca_color", "alpha_std": 0.5}, {"op": "color_shift", "limit": 30}]}, True),
    "rotate": ({"ops": [{"op": "rotate", "degrees": 30}]}, False),
    "random_resized_crop": ({"ops": [{"op": "random_resized_crop", "size": 48}, {"op": "mirror"}]}, False),
    "resize": ({"ops": [{"op": "resize", "short_side": 100}, {"op": "center_crop", "size": 90}]}, False),
    "replicate": ({"ops": [{"op": "rotate", "degrees": 40}, {"op": "shear", "degrees": 10}], "border": "replicate"}, False),
    "fill": ({"ops": [{"op": "rotate", "degrees": 40}, {"op": "color_shift", "limit": 30}], "fill": 128}, False),
    "elastic": ({"ops": [{"op": "warp", "kind": "elastic", "magnitude": 0.03}, {"op": "random_resized_crop", "size": 48}]}, False),
    "grid_warp": ({"ops": [{"op": "rotate", "degrees": 10}, {"op": "warp", "kind": "grid", "magnitude": 0.05, "p": 0.5}]}, False),
    "color_first": ({"ops": [{"op": "color_shift", "limit": 60}, {"op": "rotate", "degrees": 20}]}, False),
}


def diff_stats(a: np.ndarray, b: np.ndarray) -> tuple[float, int]:
    d = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return float(d.mean()), int(d.max())


@pytest.mark.parametrize("name", sorted(CASES))
def test_cuda_matches_cpu_and_reference(images, name):
    spec, exact = CASES[name]
    out = pipelines.build(spec, backend="torch", device="cuda")(images, seed=3)
    assert isinstance(out, torch.Tensor) and out.device.type == "cuda" and out.dtype == torch.uint8
    gpu = as_uint8_numpy(out)
    cpu = as_uint8_numpy(pipelines.build(spec, backend="torch", device="cpu")(images, seed=3))
    ref = as_uint8_numpy(pipelines.build(spec, backend="albumentations")(images, seed=3))
    assert gpu.shape == cpu.shape == ref.shape
    if exact:
        np.testing.assert_array_equal(gpu, cpu)
        np.testing.assert_array_equal(gpu, ref)
        return
    mean, worst = diff_stats(gpu, cpu)
    assert mean < 0.01 and worst <= 1, (mean, worst)
    mean, worst = diff_stats(gpu, ref)
    assert mean < MEAN_TOL and worst <= MAX_TOL, (mean, worst)


def test_inputs_already_on_the_device_and_on_the_host(images):
    spec = {"ops": [{"op": "random_resized_crop", "size": 48}, {"op": "mirror"}, {"op": "rotate", "degrees": 15}, {"op": "pca_color"}]}
    pipe = pipelines.build(spec, backend="torch", device="cuda")
    from_numpy = pipe(images, seed=1)
    from_host_tensor = pipe(torch.from_numpy(images), seed=1)
    from_device_tensor = pipe(torch.from_numpy(images).cuda(), seed=1)
    assert from_numpy.device.type == from_host_tensor.device.type == from_device_tensor.device.type == "cuda"
    assert torch.equal(from_numpy, from_host_tensor) and torch.equal(from_numpy, from_device_tensor)


def test_determinism_on_cuda(images):
    spec = {
        "ops": [
            {"op": "random_resized_crop", "size": 40},
            {"op": "mirror"},
            {"op": "rotate", "degrees": 15, "p": 0.7},
            {"op": "warp", "kind": "elastic", "magnitude": 0.03, "p": 0.6},
            {"op": "pca_color"},
            {"op": "color_shift", "limit": 15, "p": 0.5},
        ]
    }
    pipe = pipelines.build(spec, backend="torch", device="cuda")
    ids = list(range(30, 30 + len(images)))
    first = as_uint8_numpy(pipe(images, seed=4, sample_ids=ids))
    again = as_uint8_numpy(pipe(images, seed=4, sample_ids=ids))
    assert first.tobytes() == again.tobytes()
    alone = as_uint8_numpy(pipe(images[5:6], seed=4, sample_ids=[ids[5]]))
    order = [7, 5, 1, 0, 3]
    shuffled = as_uint8_numpy(pipe(images[order], seed=4, sample_ids=[ids[i] for i in order]))
    assert alone[0].tobytes() == first[5].tobytes() == shuffled[1].tobytes()


def test_mixed_sizes_and_grey_on_cuda():
    rng = np.random.default_rng(3)
    batch = [rng.integers(0, 256, size=shape, dtype=np.uint8) for shape in [(64, 80, 1), (50, 50, 1), (90, 70, 1)]]
    spec = {"ops": [{"op": "rotate", "degrees": 20}, {"op": "resize", "short_side": 36}, {"op": "color_shift"}]}
    gpu = pipelines.build(spec, backend="torch", device="cuda")(batch, seed=2)
    ref = pipelines.build(spec, backend="albumentations")(batch, seed=2)
    assert isinstance(gpu, list) and all(o.device.type == "cuda" for o in gpu)
    for g, r in zip(gpu, ref):
        assert g.shape == r.shape and g.shape[-1] == 1
        mean, worst = diff_stats(g.cpu().numpy(), r.numpy())
        assert mean < MEAN_TOL and worst <= MAX_TOL, (mean, worst)


@pytest.mark.parametrize("preset", ["alexnet", "resnet", "lenet5"])
def test_presets_with_normalize_on_cuda(preset):
    rng = np.random.default_rng(5)
    shape = (32, 32, 1) if preset == "lenet5" else (260, 300, 3)
    batch = rng.integers(0, 256, size=(4, *shape), dtype=np.uint8)
    pipe = pipelines.build(preset, backend="torch", device="cuda")
    out = pipe(batch, seed=5)
    cpu = pipelines.build(preset, backend="torch")(batch, seed=5)
    assert out.device.type == "cuda" and out.dtype == cpu.dtype and out.shape == cpu.shape
    std = torch.tensor(pipe.spec.normalize.std).view(1, -1, 1, 1)
    levels = (out.cpu() - cpu).abs() * 255.0 * std  # differences in uint8 levels
    assert levels.max() <= 1 + 1e-3 and levels.mean() < 0.01
