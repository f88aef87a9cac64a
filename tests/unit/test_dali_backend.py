"""The DALI backend (CPU build of DALI) against the albumentations/OpenCV reference on identical params.

Measured on these inputs (DALI 2.4, OpenCV 5.0): flips, integer windows, padding, identity and color
offsets are byte-identical; bilinear resampling (rotate, shear, resized crops, resize) differs from
OpenCV's fixed-point ``warpAffine`` by at most 1 level on under 4% of the values (mean |diff| <= 0.035).
Local warps run through ``cv2.remap`` on the CPU (DALI's remap is GPU-only), so they are exact here.
The tolerances below sit just above those numbers.
"""

import cv2
import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali")

import pipelines  # noqa: E402
from pipelines.backends.opencv_kernels import apply_color  # noqa: E402
from pipelines.backends.dali_backend import THREADS_ENV, DaliBackend  # noqa: E402
from pipelines.pipeline import as_uint8_numpy  # noqa: E402
from pipelines.plan import SamplePlan  # noqa: E402

INTERP_MEAN = 0.1  # mean |dali - opencv| over all values, in levels (measured <= 0.035)
INTERP_MAX = 1  # largest |dali - opencv| (measured 1)


@pytest.fixture(scope="module")
def build():
    """Pipelines cached per (spec, backend) for the module: each DALI pipeline is built once."""
    cache = {}

    def get(spec, backend="dali"):
        key = (repr(spec), backend)
        if key not in cache:
            cache[key] = pipelines.build(spec, backend=backend)
        return cache[key]

    return get


@pytest.fixture(scope="module")
def images():
    """Eight 64×80 RGB images: half smooth (upsampled noise), half raw noise (worst case for interpolation)."""
    rng = np.random.default_rng(7)
    smooth = [cv2.resize(rng.integers(0, 256, (8, 10, 3), dtype=np.uint8), (80, 64), interpolation=cv2.INTER_CUBIC) for _ in range(4)]
    noise = [rng.integers(0, 256, (64, 80, 3), dtype=np.uint8) for _ in range(4)]
    return np.stack(smooth + noise)


def both(build, spec, batch, seed=3, ids=None):
    ids = list(range(len(batch))) if ids is None else ids
    ref = as_uint8_numpy(build(spec, "albumentations")(batch, seed=seed, sample_ids=ids))
    out = as_uint8_numpy(build(spec, "dali")(batch, seed=seed, sample_ids=ids))
    return ref, out


def assert_close(ref, out, exact):
    assert ref.shape == out.shape
    if exact:
        np.testing.assert_array_equal(out, ref)
        return
    diff = np.abs(ref.astype(np.int16) - out.astype(np.int16))
    assert diff.mean() < INTERP_MEAN, f"mean |diff| {diff.mean():.4f}"
    assert diff.max() <= INTERP_MAX, f"max |diff| {diff.max()}"


# --- exact cases ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("horizontal,vertical,axes", [(1.0, 0.0, (2,)), (0.0, 1.0, (1,)), (1.0, 1.0, (1, 2))])
def test_mirror_is_np_flip_exactly(build, images, horizontal, vertical, axes):
    out = as_uint8_numpy(build({"ops": [{"op": "mirror", "horizontal": horizontal, "vertical": vertical}]})(images))
    np.testing.assert_array_equal(out, np.flip(images, axis=axes))


def test_identity_geometry_is_exactly_the_input(build, images):
    spec = {
        "ops": [
            {"op": "rotate", "degrees": 0.0},
            {"op": "shear", "degrees": 0.0},
            {"op": "random_resized_crop", "size": [64, 80], "scale": [1.0, 1.0], "ratio": [1.25, 1.25]},
        ]
    }
    np.testing.assert_array_equal(as_uint8_numpy(build(spec)(images)), images)


# --- parity with the albumentations backend ----------------------------------------------------------

PARITY = {
    # name: (spec, exact)
    "rotate": ({"ops": [{"op": "rotate", "degrees": 30}]}, False),
    "shear": ({"ops": [{"op": "shear", "degrees": 20}]}, False),
    "random_resized_crop": ({"ops": [{"op": "random_resized_crop", "size": 48}]}, False),
    "resize_down": ({"ops": [{"op": "resize", "short_side": 40}]}, False),
    "resize_up": ({"ops": [{"op": "resize", "short_side": 100}]}, False),
    "center_crop": ({"ops": [{"op": "center_crop", "size": [40, 50]}]}, True),
    "center_crop_larger": ({"ops": [{"op": "center_crop", "size": [70, 90]}]}, True),
    "random_crop_padding": ({"ops": [{"op": "random_crop", "size": 60, "padding": 8}]}, True),
    "crop_mirror": ({"ops": [{"op": "random_crop", "size": 56, "padding": 4}, {"op": "mirror"}]}, True),
    "warp_grid": ({"ops": [{"op": "warp", "kind": "grid", "magnitude": 0.05}]}, True),
    "warp_elastic_crop": ({"ops": [{"op": "warp", "kind": "elastic", "magnitude": 0.03}, {"op": "random_crop", "size": 48}]}, True),
    "pca_color": ({"ops": [{"op": "pca_color", "alpha_std": 0.5}]}, True),
    "color_shift": ({"ops": [{"op": "color_shift", "limit": 40}]}, True),
    "color_then_rotate": ({"ops": [{"op": "color_shift", "limit": 40}, {"op": "rotate", "degrees": 30}]}, False),
    "rotate_then_color": ({"ops": [{"op": "rotate", "degrees": 30}, {"op": "pca_color", "alpha_std": 0.5}]}, False),
    "rotate_warp_color": (
        {"ops": [{"op": "rotate", "degrees": 20}, {"op": "warp", "magnitude": 0.04, "p": 0.5}, {"op": "color_shift", "limit": 30}]},
        False,
    ),
    "border_replicate": ({"ops": [{"op": "rotate", "degrees": 40}, {"op": "shear", "degrees": 15}], "border": "replicate"}, False),
    "fill_128": ({"ops": [{"op": "rotate", "degrees": 40}, {"op": "random_crop", "size": 60, "padding": 6}], "fill": 128}, False),
    "warp_fill_77": ({"ops": [{"op": "rotate", "degrees": 30}, {"op": "warp", "magnitude": 0.05}], "fill": 77}, True),
}


@pytest.mark.parametrize("name", list(PARITY))
def test_parity_with_albumentations(build, images, name):
    spec, exact = PARITY[name]
    ref, out = both(build, spec, images)
    assert_close(ref, out, exact)


def test_constant_fill_reaches_the_corners(build, images):
    spec = {"ops": [{"op": "rotate", "degrees": 45}], "fill": 200}
    pipe = build(spec)
    records = pipe.sample_params([im.shape for im in images], seed=5)
    out = as_uint8_numpy(pipe(images, seed=5))
    for record, result in zip(records, out):
        if abs(record.ops[0]["angle"]) > 20:  # the corner pixel then maps far outside the image
            np.testing.assert_array_equal(result[0, 0], [200, 200, 200])


def test_presets_alexnet_with_normalize(build):
    rng = np.random.default_rng(11)
    batch = np.stack([cv2.resize(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8), (128, 96)) for _ in range(4)])
    ref = build("alexnet", "albumentations")(batch, seed=1)
    out = build("alexnet", "dali")(batch, seed=1)
    assert out.dtype == torch.float32 and out.shape == (4, 3, 224, 224)
    # One uint8 level is 1 / (255 * std) after normalize; smallest ImageNet std is 0.224.
    assert (out - ref).abs().max().item() <= 1.0 / (255 * 0.224) + 1e-5
    assert (out - ref).abs().mean().item() < INTERP_MEAN / (255 * 0.224)


def test_presets_lenet5_grey_with_normalize(build):
    rng = np.random.default_rng(12)
    batch = np.stack([cv2.resize(rng.integers(0, 256, (6, 6), dtype=np.uint8), (32, 32)) for _ in range(8)])  # N×H×W grey
    ref = build("lenet5", "albumentations")(batch, seed=2)
    out = build("lenet5", "dali")(batch, seed=2)
    assert out.shape == (8, 1, 32, 32)
    level = 1.0 / (255 * 0.36)
    assert (out - ref).abs().max().item() <= level + 1e-5
    assert (out - ref).abs().mean().item() < INTERP_MEAN * level


def test_grey_color_shift_and_rotation(build):
    rng = np.random.default_rng(13)
    batch = rng.integers(0, 256, (6, 40, 30, 1), dtype=np.uint8)
    ref, out = both(build, {"ops": [{"op": "color_shift", "limit": 50}]}, batch)
    assert_close(ref, out, exact=True)
    ref, out = both(build, {"ops": [{"op": "rotate", "degrees": 25}, {"op": "color_shift", "limit": 50}]}, batch)
    assert_close(ref, out, exact=False)


def test_mixed_input_sizes_in_one_batch(build):
    rng = np.random.default_rng(14)
    shapes = [(64, 80, 3), (50, 50, 3), (90, 60, 3), (64, 80, 1), (33, 47, 3)]
    batch = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in shapes]
    # Same output size: one tensor (grey and RGB mixed would not stack, so keep RGB only here).
    rgb = [b for b in batch if b.shape[2] == 3]
    spec = {"ops": [{"op": "random_resized_crop", "size": 32}, {"op": "pca_color"}]}
    out = build(spec)(rgb, seed=4)
    assert isinstance(out, torch.Tensor) and out.shape == (4, 32, 32, 3)
    assert_close(as_uint8_numpy(build(spec, "albumentations")(rgb, seed=4)), out.numpy(), exact=False)
    # Different output sizes (and channels): a list, each image matching the reference.
    spec = {"ops": [{"op": "rotate", "degrees": 20}, {"op": "warp", "magnitude": 0.03, "p": 0.5}, {"op": "color_shift"}]}
    out = build(spec)(batch, seed=4)
    ref = build(spec, "albumentations")(batch, seed=4)
    assert isinstance(out, list) and [tuple(o.shape) for o in out] == shapes
    for r, o in zip(ref, out):
        assert_close(r.numpy(), o.numpy(), exact=False)


def test_determinism_and_batch_independence(build, images):
    spec = {
        "ops": [
            {"op": "random_resized_crop", "size": 48},
            {"op": "mirror"},
            {"op": "rotate", "degrees": 15},
            {"op": "warp", "kind": "elastic", "magnitude": 0.02, "p": 0.5},
            {"op": "pca_color"},
        ]
    }
    pipe = build(spec)
    ids = list(range(20, 28))
    full = as_uint8_numpy(pipe(images, seed=9, epoch=1, sample_ids=ids))
    again = as_uint8_numpy(pipe(images, seed=9, epoch=1, sample_ids=ids))
    assert full.tobytes() == again.tobytes()
    alone = as_uint8_numpy(pipe(images[5:6], seed=9, epoch=1, sample_ids=[25]))
    order = [6, 5, 1]
    shuffled = as_uint8_numpy(pipe(images[order], seed=9, epoch=1, sample_ids=[ids[i] for i in order]))
    assert alone[0].tobytes() == full[5].tobytes() == shuffled[1].tobytes()
    other_seed = as_uint8_numpy(pipe(images, seed=10, epoch=1, sample_ids=ids))
    assert other_seed.tobytes() != full.tobytes()


def test_tensor_input_and_output_type(build, images):
    pipe = build({"ops": [{"op": "random_crop", "size": 48}, {"op": "mirror"}]})
    out = pipe(torch.from_numpy(images), seed=1)
    assert out.dtype == torch.uint8 and out.device.type == "cpu" and out.shape == (8, 48, 48, 3)
    np.testing.assert_array_equal(out.numpy(), as_uint8_numpy(pipe(list(images), seed=1)))


# --- backend-level behaviour --------------------------------------------------------------------------


def spec_of(ops=(), **kwargs):
    return pipelines.PipelineSpec.model_validate({"ops": list(ops), **kwargs})


def test_pipeline_is_built_once_and_grows_with_the_batch(images):
    backend = DaliBackend(spec_of([{"op": "mirror"}]))
    plans = [SamplePlan((64, 80, 3), (64, 80), inverse=np.eye(3)) for _ in range(8)]
    backend.run(list(images), plans)
    first = backend._built.copy()
    backend.run(list(images[:3]), plans[:3])
    assert backend._built == first and len(first) == 1
    (built,) = first.values()
    big = list(images) * 3  # 24 > 16 samples: rebuilt once for 32
    out = backend.run(big, plans * 3)
    (grown,) = backend._built.values()
    assert grown.max_batch == 32 and grown is not built
    np.testing.assert_array_equal(out.numpy(), np.stack(big))


def test_num_threads_option_and_environment(monkeypatch):
    spec = spec_of()
    assert DaliBackend(spec).num_threads == 1
    assert DaliBackend(spec, num_threads=3).num_threads == 3
    monkeypatch.setenv(THREADS_ENV, "2")
    assert DaliBackend(spec).num_threads == 2
    monkeypatch.setenv(THREADS_ENV, "many")
    with pytest.raises(ValueError, match=THREADS_ENV):
        DaliBackend(spec)
    with pytest.raises(ValueError, match="num_threads"):
        DaliBackend(spec, num_threads=0)


def test_color_rounding_matches_opencv_except_on_exact_ties():
    """DALI rounds half away from zero, OpenCV half to even: equal off ties, within 1 level on them."""
    image = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=2)
    backend = DaliBackend(spec_of([{"op": "color_shift"}]))
    for offset, exact in ((0.25, True), (-7.75, True), (300.0, True), (-300.0, True), (0.5, False), (10.5, False)):
        color = (np.eye(3), np.full(3, offset))
        plan = SamplePlan((16, 16, 3), (16, 16), inverse=np.eye(3), color=color)
        out = backend.run([image], [plan])[0].numpy().astype(int)
        ref = apply_color(image, *color).astype(int)
        if exact:
            np.testing.assert_array_equal(out, ref)
        else:
            assert np.abs(out - ref).max() == 1  # the tie at every other level
            assert np.array_equal(out, np.clip(np.floor(image + offset + 0.5), 0, 255))


def test_integer_translation_is_exact_far_from_the_origin():
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)
    backend = DaliBackend(spec_of([{"op": "center_crop", "size": 8}]))
    inverse = np.array([[1.0, 0.0, 391.0], [0.0, 1.0, 291.0], [0.0, 0.0, 1.0]])
    out = backend.run([image], [SamplePlan((300, 400, 3), (12, 12), inverse=inverse)])[0].numpy()
    np.testing.assert_array_equal(out[:9, :9], image[291:, 391:])
    assert (out[9:] == 0).all() and (out[:, 9:] == 0).all()  # outside the image: the fill


def test_bad_arguments():
    with pytest.raises(ValueError, match="does not run on device"):
        DaliBackend(spec_of(), device="tpu")
    backend = DaliBackend(spec_of())
    with pytest.raises(ValueError, match="plans for"):
        backend.run([np.zeros((4, 4, 3), np.uint8)], [])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without CUDA")
def test_cuda_without_cuda_is_refused():
    with pytest.raises(ValueError, match="CUDA is not available"):
        DaliBackend(spec_of(), device="cuda")



def test_gpu_remap_inputs_stay_inside_the_fill_ring(build, images):
    """The GPU remap path (NPP leaves out-of-image pixels unwritten) must only ever sample inside the
    canvas: its maps are built here on the CPU and checked, and the torch map equals the numpy one."""
    from pipelines.source_map import source_map

    spec = {"ops": [{"op": "rotate", "degrees": 40}, {"op": "warp", "magnitude": 0.08}, {"op": "resize", "short_side": 90}], "fill": 9}
    pipe = build(spec)
    plans = pipe.plans(pipe.sample_params([im.shape for im in images], seed=2))
    inputs = pipe.backend._remap_inputs(list(images), plans)
    leaves = []
    for k, plan in enumerate(plans):
        x, y = source_map(plan, device="cpu")
        ref_x, ref_y = source_map(plan, dtype=np.float64)
        np.testing.assert_allclose(x.numpy(), ref_x, atol=1e-9)
        np.testing.assert_allclose(y.numpy(), ref_y, atol=1e-9)
        (canvas_h, canvas_w), (out_h, out_w) = inputs["canvas"][k], plan.out_hw
        assert canvas_h >= max(64 + 3, out_h) and canvas_w >= max(80 + 3, out_w)
        mapx, mapy = inputs["mapx"][k].numpy(), inputs["mapy"][k].numpy()
        assert mapx.shape == (canvas_h, canvas_w)
        assert mapx.min() >= 0 and mapx.max() <= 80 + 1 and mapy.min() >= 0 and mapy.max() <= 64 + 1
        leaves.append(mapx[:out_h, :out_w].max() == 80 + 1)
    assert any(leaves)  # some samples do leave the image: they read the ring
