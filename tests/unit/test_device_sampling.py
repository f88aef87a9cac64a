"""Parameters sampled and fused with torch (here on the CPU) against the numpy path they mirror.

Expectations: the RNG is bit-identical (keys, raw 64-bit outputs, uniforms). Parameters and fused plans
are bit-identical for ops whose formulas use only +, −, ×, ÷, sqrt, floor and round (crops, mirror,
resize, random-resized-crop boxes, color shift, grid warps); where ``exp``/``log1p``/``cos``/``sin``/
``tan`` enter (rotate, shear, PCA lighting, elastic warps) torch's functions may differ from numpy's by
an ulp, so floats are compared within 1e-9 (the issue allows 1e-6) and integers still exactly. Output
bytes of ``Pipeline(sampling="device")`` equal those of the numpy-sampled run.
"""

import numpy as np
import pytest
import torch

import pipelines
from pipelines import device_rng, rng
from pipelines.batched_plan import FACT_COLUMNS, FusedBatch, copy_windows, facts_table
from pipelines.device_fusion import DevicePlanner, fuse_on_device, plan_on_device
from pipelines import device_sampling
from pipelines.device_sampling import DEVICE_SAMPLERS, constant, device_inputs, keeping_constants, sample_on_device
from pipelines.pipeline import Pipeline
from pipelines.plan import axis_aligned, fuse_batch
from pipelines.presets import list_presets, resolve
from pipelines.sampling import SAMPLERS, sample_batch

FLOAT_ATOL = 1e-9
SEEDS = [0, 1, 12345, 2**32 + 7, 2**63 - 1, 2**63, 2**64 - 1]
EPOCHS = [0, 1, 7, 2**31, 2**64 - 1]


def some_ids(rng_, count=64):
    """Small ids, ids around 2**40 and a few huge ones."""
    return np.concatenate([np.arange(8), 2**40 + np.arange(-4, 4), rng_.integers(0, 2**62, count - 16)]).astype(np.int64)


# --- the generator ------------------------------------------------------------------------------------


@pytest.mark.parametrize("epoch", EPOCHS)
@pytest.mark.parametrize("seed", SEEDS)
def test_keys_and_raw_streams_have_every_bit_of_numpy(seed, epoch):
    ids = some_ids(np.random.default_rng(seed % 1000 + epoch % 1000))
    keys = rng.sample_keys(seed, epoch, ids)
    keys_t = device_rng.sample_keys(seed, epoch, torch.from_numpy(ids))
    np.testing.assert_array_equal(keys_t.numpy(), keys.view(np.int64))
    start, count = 5, 37
    steps = np.arange(start + 1, start + count + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        bits = rng._mix(keys[:, None] + steps[None, :] * rng._GAMMA)
    np.testing.assert_array_equal(device_rng.raw_bits(keys_t, start, count).numpy(), bits.view(np.int64))
    np.testing.assert_array_equal(device_rng.uniforms(keys_t, start, count).numpy(), rng.uniforms(keys, start, count))
    normals = device_rng.normals(keys_t, start, 7).numpy()
    assert normals.shape == (len(ids), 7)
    np.testing.assert_allclose(normals, rng.normals(keys, start, 7), rtol=0, atol=FLOAT_ATOL)


def test_a_flipped_bit_is_caught():
    """The comparison above sees the lowest bit: the stream of key k differs from that of k ^ 1."""
    keys = torch.tensor([12345, 12345 ^ 1])
    bits = device_rng.raw_bits(keys, 0, 4)
    assert (bits[0] != bits[1]).all()


def test_seeds_outside_uint64_are_refused_like_numpy():
    for bad in (-1, 2**64):
        with pytest.raises(OverflowError):
            rng.sample_keys(bad, 0, [0])
        with pytest.raises(OverflowError):
            device_rng.sample_keys(bad, 0, torch.tensor([0]))


# --- samplers -----------------------------------------------------------------------------------------

OP_SPECS = {
    "mirror": [{"op": "mirror", "horizontal": 0.5, "vertical": 0.3}],
    "random_crop": [{"op": "random_crop", "size": [20, 24], "padding": 5}],
    "random_resized_crop": [{"op": "random_resized_crop", "size": [30, 40], "scale": [0.05, 1.0], "ratio": [0.5, 2.0]}],
    "rotate": [{"op": "rotate", "degrees": 40, "p": 0.6}],
    "shear": [{"op": "shear", "degrees": 25, "p": 0.7}],
    "warp": [{"op": "warp", "kind": "grid", "magnitude": 0.1, "p": 0.5}, {"op": "warp", "kind": "elastic", "magnitude": 0.05, "cells": 3}],
    "resize": [{"op": "resize", "short_side": [20, 90]}, {"op": "resize", "short_side": 33}],
    "center_crop": [{"op": "center_crop", "size": [25, 31]}],
    "pca_color": [{"op": "pca_color", "alpha_std": 0.7}],
    "color_shift": [{"op": "color_shift", "limit": 30, "g": 4, "p": 0.6}],
}
TRANSCENDENTAL = {("rotate", "angle"), ("shear", "x"), ("shear", "y"), ("pca_color", "alpha"), ("pca_color", "offset")}
FULL_CHAIN = [
    {"op": "random_resized_crop", "size": 48},
    {"op": "mirror"},
    {"op": "rotate", "degrees": 15, "p": 0.8},
    {"op": "shear", "degrees": 10, "p": 0.5},
    {"op": "pca_color"},
    {"op": "color_shift", "limit": 20, "p": 0.5},
    {"op": "normalize", "dtype": "float16"},
]


def test_every_numpy_sampler_has_a_device_twin():
    assert set(DEVICE_SAMPLERS.names()) == set(SAMPLERS.names()) == set(OP_SPECS)


def mixed_shapes(count, rng_, channels=3):
    """Shapes from 1 pixel to 300, square, wide and tall."""
    heights, widths = rng_.integers(1, 300, count), rng_.integers(1, 300, count)
    widths[: count // 4] = heights[: count // 4]
    return np.stack([heights, widths, np.full(count, channels)], axis=1)


def device_params(spec, shapes, seed, epoch, ids):
    return sample_on_device(spec, torch.from_numpy(device_inputs(shapes, seed, epoch, ids)))


def assert_params_match(numpy_ops, device_ops):
    assert [name for name, _ in numpy_ops] == [name for name, _ in device_ops]
    for (name, expected), (_, got) in zip(numpy_ops, device_ops):
        assert set(expected) == set(got), name
        for key, value in expected.items():
            if not isinstance(value, np.ndarray):
                assert got[key] == value, (name, key)
                continue
            array = got[key].numpy()
            assert array.shape == value.shape and array.dtype == value.dtype, (name, key, array.dtype, value.dtype)
            if (name, key) in TRANSCENDENTAL or (name, key) == ("warp", "control"):  # grid warps: exact, below
                np.testing.assert_allclose(array, value, rtol=0, atol=FLOAT_ATOL, err_msg=f"{name}.{key}")
            else:
                np.testing.assert_array_equal(array, value, err_msg=f"{name}.{key}")


@pytest.mark.parametrize("op", sorted(OP_SPECS))
def test_each_op_draws_what_numpy_draws(op):
    spec = pipelines.PipelineSpec.model_validate({"ops": OP_SPECS[op]})
    generator = np.random.default_rng(len(op))
    for seed, epoch in [(0, 0), (3, 1), (2**63 + 11, 2**40), (2**64 - 1, 0)]:
        shapes = mixed_shapes(96, generator)
        if op in ("random_crop", "center_crop"):  # a crop needs room (center_crop pads, but keep both alike)
            shapes[:, :2] = np.maximum(shapes[:, :2], 32)
        ids = some_ids(generator, 96)
        expected = sample_batch(spec, shapes, seed, epoch, ids)
        got = device_params(spec, shapes, seed, epoch, ids)
        assert_params_match(expected.ops, got.ops)
        np.testing.assert_array_equal(got.out_hw.numpy(), expected.out_hw)
        assert not got.invalid.any()


def test_grid_warp_controls_are_bit_identical_and_elastic_ones_close():
    spec = pipelines.PipelineSpec.model_validate({"ops": OP_SPECS["warp"]})
    shapes, ids = mixed_shapes(40, np.random.default_rng(0)), np.arange(40)
    expected, got = sample_batch(spec, shapes, 9, 2, ids), device_params(spec, shapes, 9, 2, ids)
    np.testing.assert_array_equal(got.ops[0][1]["control"].numpy(), expected.ops[0][1]["control"])
    np.testing.assert_allclose(got.ops[1][1]["control"].numpy(), expected.ops[1][1]["control"], rtol=0, atol=FLOAT_ATOL)
    assert got.ops[1][1]["kind"] == "elastic" and (got.ops[1][1]["control"][:, 0] == 0).all()


def test_random_resized_crop_fallback_on_extreme_aspects():
    """Boxes that no try can fit (ratio 1 on 1×400 strips, tiny images, high scale) take the centred
    fallback, mixed in one batch with samples whose tries fit."""
    spec = pipelines.PipelineSpec.model_validate({"ops": [{"op": "random_resized_crop", "size": 16, "scale": [0.9, 1.0], "ratio": [1.0, 1.0]}]})
    shapes = np.array([(20, 400, 3), (400, 20, 3), (1, 400, 3), (400, 1, 3), (1, 1, 3), (2, 3, 3), (64, 64, 3), (65, 64, 3), (100, 120, 3)] * 6)
    ids = np.arange(len(shapes)) + 2**40
    expected = sample_batch(spec, shapes, 1, 0, ids)
    got = device_params(spec, shapes, 1, 0, ids)
    assert_params_match(expected.ops, got.ops)
    record = expected.ops[0][1]
    assert record["height"][0] == 20 and record["width"][0] == 20 and record["left"][0] == 190  # the fallback
    assert record["height"][6] * record["width"][6] >= 0.9 * 64 * 64 - 64  # a try that fits
    # And with a ratio range the fallback clips to its ends.
    spec = pipelines.PipelineSpec.model_validate({"ops": [{"op": "random_resized_crop", "size": 16, "scale": [1.0, 1.0], "ratio": [0.75, 1.333]}]})
    assert_params_match(sample_batch(spec, shapes, 2, 5, ids).ops, device_params(spec, shapes, 2, 5, ids).ops)


# --- fusion -------------------------------------------------------------------------------------------


def fused_pair(spec, shapes, seed, epoch, ids):
    spec = resolve(spec).without_normalize()
    plans = fuse_batch(sample_batch(spec, shapes, seed, epoch, ids))
    return FusedBatch.from_plans(plans), fuse_on_device(device_params(spec, shapes, seed, epoch, ids))


def assert_fused_match(host: FusedBatch, device, exact: bool):
    np.testing.assert_array_equal(device.out_hw.numpy(), host.out_hw.numpy())
    np.testing.assert_array_equal(device.colored.numpy(), host.colored.numpy())
    for name in ("inverse", "offsets"):
        got, expected = getattr(device, name).numpy(), getattr(host, name).numpy()
        if exact:
            np.testing.assert_array_equal(got, expected, err_msg=name)
        else:
            np.testing.assert_allclose(got, expected, rtol=1e-12, atol=FLOAT_ATOL, err_msg=name)
    assert not device.invalid.any()


EXACT_SPECS = {
    "crops_and_flips": [{"op": "random_crop", "size": 24, "padding": 4}, {"op": "mirror", "vertical": 0.5}, {"op": "center_crop", "size": [20, 22]}],
    "resized_crop": [{"op": "resize", "short_side": [40, 70]}, {"op": "random_resized_crop", "size": [28, 36]}, {"op": "mirror"}, {"op": "color_shift", "limit": 40}],
    "color_first": [{"op": "color_shift", "limit": 60}, {"op": "mirror"}, {"op": "resize", "short_side": 50}],
}


@pytest.mark.parametrize("name", sorted(EXACT_SPECS))
def test_fusion_without_transcendentals_is_bit_identical(name):
    generator = np.random.default_rng(3)
    shapes = np.maximum(mixed_shapes(80, generator), [40, 40, 3])
    host, device = fused_pair({"ops": EXACT_SPECS[name]}, shapes, 5, 2, some_ids(generator, 80))
    assert_fused_match(host, device, exact=True)


@pytest.mark.parametrize("spec", [*list_presets(), "full_chain"])
def test_fusion_of_presets_and_the_full_chain(spec):
    spec = {"ops": FULL_CHAIN} if spec == "full_chain" else spec
    grey = resolve(spec).name == "lenet5"
    generator = np.random.default_rng(11)
    for seed, epoch in [(0, 0), (2**64 - 1, 3)]:
        shapes = np.maximum(mixed_shapes(64, generator, channels=1 if grey else 3), [32, 32, 1])
        host, device = fused_pair(spec, shapes, seed, epoch, some_ids(generator, 64))
        assert_fused_match(host, device, exact=False)


def test_copy_windows_agree_with_axis_aligned():
    """The torch twin of plan.axis_aligned finds the same pixel copies and windows, including plans a
    hair away from whole pixels (on either side of PIXEL_ATOL)."""
    spec = {"ops": [{"op": "random_crop", "size": [40, 44], "padding": 6}, {"op": "mirror", "horizontal": 0.5, "vertical": 0.5}, {"op": "rotate", "degrees": 5, "p": 0.3}]}
    pipe = pipelines.build(spec, backend="torch")
    plans = pipe.plans(pipe.sample_params([(50, 60, 3)] * 200, seed=4))
    before = axis_aligned(plans).copies
    assert 20 < before.sum() < 190
    nudged = np.flatnonzero(before)[:6]
    for k, nudge in zip(nudged, [1e-10, -1e-10, 1e-12, 1e-8, -1e-8, 1e-6]):
        plans[k].inverse = plans[k].inverse.copy()
        plans[k].inverse[0, 2] += nudge
        plans[k].inverse[1, 2] -= nudge
    facts = axis_aligned(plans)
    assert facts.copies[nudged].tolist() == [True, True, True, False, False, False]  # within PIXEL_ATOL or not
    copies, windows = copy_windows(torch.from_numpy(np.stack([p.inverse for p in plans])), torch.tensor([p.out_hw for p in plans]))
    np.testing.assert_array_equal(copies.numpy(), facts.copies)
    for k in np.flatnonzero(facts.copies):
        top, left = facts.window(k)
        (out_h, out_w), flip_y, flip_x = plans[k].out_hw, facts.flip_y[k], facts.flip_x[k]
        expected = (top + (out_h - 1) * flip_y, -1 if flip_y else 1, left + (out_w - 1) * flip_x, -1 if flip_x else 1)
        assert tuple(windows[k].tolist()) == expected


def test_facts_of_both_paths_are_equal():
    spec = resolve("inception").without_normalize()
    shapes, ids = [(70, 90, 3)] * 50, np.arange(50)
    host, device = fused_pair(spec, shapes, 1, 1, ids)
    planned = plan_on_device(spec, shapes, 1, 1, ids, "cpu")
    np.testing.assert_array_equal(facts_table(host).numpy(), planned.facts.numpy())
    np.testing.assert_array_equal(facts_table(device).numpy(), planned.facts.numpy())
    assert planned.facts.shape == (50, len(FACT_COLUMNS))


# --- the pipeline: same bytes -------------------------------------------------------------------------


def pair(spec, **kwargs):
    host = Pipeline(resolve(spec), backend="torch", sampling="host", **kwargs)
    device = Pipeline(resolve(spec), backend="torch", sampling="device", **kwargs)
    assert host.sampling == "host" and device.sampling == "device"
    return host, device


def assert_same_bytes(a, b):
    if isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b)
        for x, y in zip(a, b):
            assert x.dtype == y.dtype and x.shape == y.shape and x.numpy().tobytes() == y.numpy().tobytes()
    else:
        assert a.dtype == b.dtype and a.shape == b.shape and a.numpy().tobytes() == b.numpy().tobytes()


def noise(shape, count, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(count, *shape), dtype=np.uint8)


@pytest.mark.parametrize("preset", list_presets())
def test_presets_give_the_same_bytes(preset):
    host, device = pair(preset)
    shape = (36, 40, 1) if preset == "lenet5" else (160, 200, 3)
    if preset == "vgg":
        shape = (120, 150, 3)
    batch = noise(shape, 12)
    for seed, epoch, ids in [(0, 0, None), (2**63 + 3, 9, 2**40 + np.arange(12))]:
        assert_same_bytes(host(batch, seed=seed, epoch=epoch, sample_ids=ids), device(batch, seed=seed, epoch=epoch, sample_ids=ids))


CHAINS = {
    "full_chain": {"ops": FULL_CHAIN},
    "full_chain_replicate": {"ops": FULL_CHAIN[:-1], "border": "replicate"},
    "copies_with_fill": {"ops": [{"op": "random_crop", "size": [40, 44], "padding": 8}, {"op": "mirror", "vertical": 0.5}, {"op": "color_shift", "limit": 50}], "fill": 77},
    "center_crop_larger": {"ops": [{"op": "center_crop", "size": [70, 90]}, {"op": "pca_color", "alpha_std": 0.5}], "fill": 9},
    "some_copies_some_not": {"ops": [{"op": "random_resized_crop", "size": [40, 48], "scale": [1.0, 1.0], "ratio": [1.2, 1.2]}, {"op": "mirror"}, {"op": "rotate", "degrees": 20, "p": 0.5}]},
    "color_first": {"ops": [{"op": "color_shift", "limit": 60}, {"op": "pca_color"}, {"op": "rotate", "degrees": 20}, {"op": "center_crop", "size": 40}]},
}


@pytest.mark.parametrize("name", sorted(CHAINS))
def test_chains_give_the_same_bytes_on_uniform_and_mixed_batches(name):
    host, device = pair(CHAINS[name])
    batch = noise((48, 60, 3), 10, seed=1)
    assert_same_bytes(host(batch, seed=2), device(batch, seed=2))
    assert_same_bytes(host(torch.from_numpy(batch), seed=2), device(torch.from_numpy(batch), seed=2))
    generator = np.random.default_rng(2)
    mixed = [generator.integers(0, 256, size=(h, w, 3), dtype=np.uint8) for h, w in [(48, 60), (30, 30), (48, 60), (64, 41), (30, 30), (55, 80)]]
    assert_same_bytes(host(mixed, seed=5, epoch=1), device(mixed, seed=5, epoch=1))


def test_outputs_of_different_sizes_and_grey_images():
    spec = {"ops": [{"op": "rotate", "degrees": 20}, {"op": "resize", "short_side": 36}, {"op": "mirror"}, {"op": "color_shift"}]}
    host, device = pair(spec)
    generator = np.random.default_rng(4)
    for channels in (3, 1):
        batch = [generator.integers(0, 256, size=(h, w, channels), dtype=np.uint8) for h, w in [(64, 80), (50, 50), (64, 80), (90, 70)]]
        out = device(batch, seed=1)
        assert isinstance(out, list) and len({tuple(o.shape) for o in out}) > 1
        assert_same_bytes(host(batch, seed=1), out)


def test_the_device_path_builds_no_host_parameters(monkeypatch):
    host, device = pair({"ops": FULL_CHAIN})
    batch = noise((48, 60, 3), 6)
    expected = host(batch, seed=3)

    def refuse(*args, **kwargs):
        raise AssertionError("the device path built host parameters")

    for target in ("pipelines.pipeline.sample_batch", "pipelines.pipeline.fuse_batch", "pipelines.sampling.sample_batch", "pipelines.plan.fuse_batch"):
        monkeypatch.setattr(target, refuse)
    monkeypatch.setattr(FusedBatch, "from_plans", classmethod(refuse))
    monkeypatch.setattr(Pipeline, "_sample", refuse)
    assert_same_bytes(expected, device(batch, seed=3))
    # Nor with out=: the destination is sized from the device plan's facts.
    uint8 = Pipeline(resolve({"ops": FULL_CHAIN[:-1]}), backend="torch", sampling="device")
    shapes = []
    out = uint8(batch, seed=3, out=lambda shape: shapes.append(shape) or torch.empty(shape, dtype=torch.uint8))
    assert shapes == [(6, 48, 48, 3)] and out.shape == (6, 48, 48, 3)


def test_the_device_work_is_capturable():
    """What a CUDA graph needs, checked on the CPU: after a warm-up, the device work of a batch creates
    no tensor from host data and reads no value back (either would break or bake into a capture)."""
    planner = DevicePlanner(resolve({"ops": FULL_CHAIN[:-1] + [{"op": "resize", "short_side": [40, 60]}, {"op": "center_crop", "size": 32}]}).without_normalize(), "cpu")
    inputs = torch.from_numpy(device_inputs([(50, 70, 3)] * 8, 1, 2, range(8)))
    expected = planner.work(inputs)
    forbidden = {torch.tensor, torch.as_tensor, torch.from_numpy, torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.cpu, torch.Tensor.__bool__}
    seen = []

    class Watch(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func in forbidden:
                seen.append(func)
            return func(*args, **(kwargs or {}))

    with Watch():
        again = planner.work(inputs)
    assert not seen, seen
    with Watch():  # the watch does see them
        bool(torch.tensor([1.0]).sum() > 0)
    assert seen == [torch.tensor, torch.Tensor.__bool__]
    for a, b in zip(expected, again):
        assert torch.equal(a, b)


def test_host_fallbacks_are_explicit_and_give_the_same_bytes():
    warp = {"ops": [{"op": "rotate", "degrees": 10}, {"op": "warp", "kind": "elastic", "p": 0.5}, {"op": "center_crop", "size": 40}]}
    pipe = Pipeline(resolve(warp), backend="torch", sampling="device")
    assert pipe.sampling == "host"  # no device version of local warps
    assert Pipeline(resolve("resnet"), backend="torch").sampling == "host"  # auto: host on the CPU
    assert Pipeline(resolve("resnet"), backend="torch", fused=False, sampling="auto").sampling == "host"
    # Replay and sample_params take the numpy path of a device-sampling pipeline, with its bytes; out=
    # takes the device path and its bytes.
    host, device = pair({"ops": FULL_CHAIN[:-1]})
    batch = noise((48, 60, 3), 5)
    expected = host(batch, seed=7, sample_ids=[3, 1, 4, 1, 5])
    out = torch.empty_like(expected)
    assert device(batch, seed=7, sample_ids=[3, 1, 4, 1, 5], out=out) is out
    assert_same_bytes(expected, out)
    records = device.sample_params([b.shape for b in batch], seed=7, sample_ids=[3, 1, 4, 1, 5])
    assert_same_bytes(expected, device.apply(batch, records))


def test_out_mistakes_read_as_on_the_host_path():
    cases = [
        ({"ops": [{"op": "resize", "short_side": 30}]}, [noise((40, 60, 3), 1)[0], noise((50, 50, 3), 1)[0]], lambda shape: torch.empty(shape, dtype=torch.uint8)),
        ({"ops": [{"op": "mirror"}]}, noise((20, 20, 3), 2), torch.empty((2, 20, 21, 3), dtype=torch.uint8)),
        ({"ops": [{"op": "mirror"}, {"op": "normalize"}]}, noise((20, 20, 3), 2), torch.empty((2, 20, 20, 3), dtype=torch.uint8)),
        ({"ops": [{"op": "random_crop", "size": 50}]}, noise((40, 60, 3), 2), torch.empty((2, 50, 50, 3), dtype=torch.uint8)),
    ]
    for spec, batch, out in cases:
        host, device = pair(spec)
        with pytest.raises(ValueError) as expected:
            host(batch, out=out)
        with pytest.raises(ValueError) as got:
            device(batch, out=out)
        assert str(got.value) == str(expected.value)


def test_the_bench_runs_on_the_cpu():
    from augserve.bench.sampling import format_table, run_sampling_bench

    result = run_sampling_bench(batch=8, rounds=2, devices=["cpu"])
    assert [row["name"] for row in result["rows"]] == ["numpy sample + fuse (cpu worker)", "numpy sample + fuse + batch arrays (cpu worker)", "device sample + fuse on cpu"]
    assert all(row["ms_per_batch"] > 0 for row in result["rows"]) and "| cpu |" in format_table(result)


def test_mistakes_end_in_the_numpy_paths_messages():
    with pytest.raises(ValueError, match="sampling must be one of auto, host, device, got 'gpu'"):
        Pipeline(resolve("resnet"), backend="torch", sampling="gpu")
    with pytest.raises(ValueError, match="needs the torch backend"):
        Pipeline(resolve("resnet"), backend="albumentations", sampling="device")
    with pytest.raises(ValueError, match="needs the fused path"):
        Pipeline(resolve("resnet"), backend="torch", fused=False, sampling="device")
    cases = [
        ({"ops": [{"op": "random_crop", "size": 50}]}, noise((40, 60, 3), 3), {}),  # crop larger than the image
        ({"ops": [{"op": "resize", "short_side": [20, 60]}, {"op": "random_crop", "size": 40}]}, noise((40, 60, 3), 8), {}),  # depends on draws
        ({"ops": [{"op": "pca_color"}]}, noise((20, 20, 1), 2), {}),  # PCA lighting of grey images
        ({"ops": [{"op": "mirror"}]}, noise((20, 20, 3), 2), {"seed": -1}),
        ({"ops": [{"op": "mirror"}]}, noise((20, 20, 3), 2), {"sample_ids": [1, 2, 3]}),
        ({"ops": [{"op": "mirror"}]}, noise((20, 20, 3), 2), {"sample_ids": [1, -2]}),
    ]
    for spec, batch, kwargs in cases:
        host, device = pair(spec)
        with pytest.raises(ValueError) as expected:
            host(batch, **kwargs)
        with pytest.raises(ValueError) as got:
            device(batch, **kwargs)
        assert str(got.value) == str(expected.value)


def test_a_graph_owner_keeps_the_constants_the_bounded_cache_drops():
    """keeping_constants collects every constant handed out in its block (nested blocks both), so a CUDA
    graph's owner holds the tensors the graph reads even after the cache evicted them; outside a block
    nothing is collected."""
    cpu = torch.device("cpu")
    with keeping_constants() as outer:
        first = constant((1.5, 2.5), torch.float64, cpu)
        with keeping_constants() as inner:
            second = constant((7.0,), torch.float32, cpu)
            assert constant((7.0,), torch.float32, cpu) is second  # cached: one upload
    constant((9.0,), torch.float64, cpu)  # after the blocks: kept by neither
    assert list(outer.values()) == [first, second] and list(inner.values()) == [second]
    device_sampling._uploaded.cache_clear()  # the cache lets go of them (as eviction would) ...
    assert constant((1.5, 2.5), torch.float64, cpu) is not first  # ... a new upload now
    assert outer[id(first)] is first and torch.equal(first, torch.tensor([1.5, 2.5], dtype=torch.float64))  # ... still held


def test_a_planner_remembers_which_batch_sizes_it_met_within_a_bound():
    """What decides a CUDA graph capture (on a size's second batch): a size met before, of the last
    MAX_SIZES_MET sizes."""
    from pipelines.device_fusion import MAX_SIZES_MET

    planner = DevicePlanner(pipelines.PipelineSpec.model_validate({"ops": [{"op": "mirror"}]}), "cpu", graphs=False)
    assert [planner._met_before(size) for size in (64, 61, 64, 64, 61)] == [False, False, True, True, True]
    for size in range(1000, 1000 + MAX_SIZES_MET):  # enough other sizes to push 64 and 61 out
        planner._met_before(size)
    assert len(planner._sizes_met) == MAX_SIZES_MET and not planner._met_before(61)
