"""Parameters sampled and fused on CUDA (``Pipeline(sampling="device")``, the default on a GPU) against
the numpy path: the same parameters (integers exactly; floats within 1e-9, as CUDA's ``exp``/``cos``/…
may differ from numpy's by an ulp, and bit for bit where no such function enters), the same output
bytes as a numpy-sampled run on the same GPU, CUDA graph replays equal to eager runs, and a host cost
per batch below the numpy path's that does not grow with the batch size.
"""

import statistics
import time

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

import pipelines  # noqa: E402
from augserve.bench.gpu_candidates import GPU_CHAIN  # noqa: E402
from pipelines.batched_plan import FusedBatch, facts_table  # noqa: E402
from pipelines.device_fusion import DevicePlanner  # noqa: E402
from pipelines.device_sampling import device_inputs, sample_on_device  # noqa: E402
from pipelines.pipeline import Pipeline  # noqa: E402
from pipelines.plan import fuse_batch  # noqa: E402
from pipelines.presets import list_presets, resolve  # noqa: E402
from pipelines.sampling import sample_batch  # noqa: E402

FLOAT_ATOL = 1e-9
CHAIN = {"ops": GPU_CHAIN["ops"][:-1]}
EXACT = {  # no transcendental function: bit-identical plans
    "ops": [
        {"op": "resize", "short_side": [40, 70]},
        {"op": "random_resized_crop", "size": [28, 36], "scale": [0.05, 1.0], "ratio": [0.5, 2.0]},
        {"op": "mirror", "vertical": 0.3},
        {"op": "random_crop", "size": 24, "padding": 3},
        {"op": "center_crop", "size": [20, 22]},
        {"op": "color_shift", "limit": 40, "p": 0.6},
    ]
}


def batch_inputs(count, seed):
    rng = np.random.default_rng(seed)
    shapes = np.stack([rng.integers(30, 300, count), rng.integers(30, 300, count), np.full(count, 3)], axis=1)
    shapes[: count // 8, 1] = 1 + shapes[: count // 8, 0] // 20  # strips: random-resized-crop fallbacks
    ids = np.concatenate([np.arange(count // 2), 2**40 + rng.integers(0, 2**20, count - count // 2)])
    return shapes, ids


@pytest.mark.parametrize("name", ["chain", "exact"])
def test_parameters_and_plans_match_numpy(name):
    spec = pipelines.PipelineSpec.model_validate(CHAIN if name == "chain" else EXACT)
    for seed, epoch in [(0, 0), (2**64 - 1, 7)]:
        shapes, ids = batch_inputs(256, seed % 97)
        expected = sample_batch(spec, shapes, seed, epoch, ids)
        got = sample_on_device(spec, torch.from_numpy(device_inputs(shapes, seed, epoch, ids)).cuda())
        for (op, arrays), (_, tensors) in zip(expected.ops, got.ops):
            for key, value in arrays.items():
                if not isinstance(value, np.ndarray):
                    continue
                array = tensors[key].cpu().numpy()
                if value.dtype.kind == "f" and name == "chain":
                    np.testing.assert_allclose(array, value, rtol=0, atol=FLOAT_ATOL, err_msg=f"{op}.{key}")
                else:
                    np.testing.assert_array_equal(array, value, err_msg=f"{op}.{key}")
        host = FusedBatch.from_plans(fuse_batch(expected))
        fused = DevicePlanner(spec, "cuda")(shapes, seed, epoch, ids)
        np.testing.assert_array_equal(fused.out_hw.cpu().numpy(), host.out_hw.numpy())
        np.testing.assert_array_equal(fused.colored.cpu().numpy(), host.colored.numpy())
        for key in ("inverse", "offsets"):
            got_values, expected_values = getattr(fused, key).cpu().numpy(), getattr(host, key).numpy()
            if name == "exact":
                np.testing.assert_array_equal(got_values, expected_values, err_msg=key)
            else:
                np.testing.assert_allclose(got_values, expected_values, rtol=1e-12, atol=FLOAT_ATOL, err_msg=key)
        np.testing.assert_array_equal(fused.facts.cpu().numpy(), facts_table(host).numpy())


def test_graph_replays_equal_eager_runs_for_every_batch():
    """One graph per batch size, replayed for batches that differ in seed, epoch, ids and shapes: nothing
    of the first batch is baked into it."""
    spec = pipelines.PipelineSpec.model_validate(EXACT)
    graphed, eager = DevicePlanner(spec, "cuda"), DevicePlanner(spec, "cuda", graphs=False)
    assert graphed.graphs
    for k, (seed, epoch) in enumerate([(1, 0), (2, 0), (1, 5), (2**63, 2**40)]):
        shapes, ids = batch_inputs(64, k)
        a, b = graphed(shapes, seed, epoch, ids), eager(shapes, seed, epoch, ids)
        for name in ("inverse", "out_hw", "offsets", "colored", "invalid", "facts"):
            assert torch.equal(getattr(a, name), getattr(b, name)), (k, name)
    assert graphed.graphs and len(graphed._replays) == 1  # captured once, not fallen back to eager


def test_a_batch_size_met_once_runs_eagerly_and_one_that_comes_back_gets_its_graph():
    """A re-planned batch (corrupt files dropped), an epoch's last batch or a half after running out of
    memory has a size of its own: no capture for it; the size that comes back is captured and replayed."""
    spec = pipelines.PipelineSpec.model_validate(EXACT)
    graphed, eager = DevicePlanner(spec, "cuda"), DevicePlanner(spec, "cuda", graphs=False)
    for k, size in enumerate([64, 61, 64, 32, 64]):
        shapes, ids = batch_inputs(size, k)
        a, b = graphed(shapes, 3, k, ids), eager(shapes, 3, k, ids)
        assert torch.equal(a.facts, b.facts) and torch.equal(a.inverse, b.inverse), (k, size)
    assert graphed.graphs and list(graphed._replays) == [64]


def test_graph_replays_survive_the_constant_cache_letting_go():
    """A captured graph reads the spec's constants at their capture-time addresses. The cache of
    constants is bounded; once it drops them (cleared here) and their memory is reused (filled with
    other tensors), replays must still equal eager runs: the graph's owner holds them."""
    from pipelines import device_sampling

    spec = pipelines.PipelineSpec.model_validate(EXACT)
    graphed, eager = DevicePlanner(spec, "cuda"), DevicePlanner(spec, "cuda", graphs=False)
    shapes, ids = batch_inputs(64, 0)
    graphed(shapes, 1, 0, ids)
    graphed(shapes, 1, 0, ids)  # the second batch of a size captures its graph
    assert len(graphed._replays) == 1
    device_sampling._uploaded.cache_clear()
    torch.cuda.synchronize()
    clutter = [torch.full((k + 1,), 123456.0, dtype=torch.float64, device="cuda") for k in range(64)]  # reuses freed blocks
    for k, (seed, epoch) in enumerate([(3, 1), (4, 2)]):
        shapes, ids = batch_inputs(64, k + 1)
        a, b = graphed(shapes, seed, epoch, ids), eager(shapes, seed, epoch, ids)
        for name in ("inverse", "out_hw", "offsets", "colored", "invalid", "facts"):
            assert torch.equal(getattr(a, name), getattr(b, name)), (k, name)
    assert graphed.graphs and len(graphed._replays) == 1 and clutter


def noise(shape, count, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(count, *shape), dtype=np.uint8)


def assert_same_bytes(a, b):
    if isinstance(a, list):
        assert isinstance(b, list) and all(torch.equal(x, y) for x, y in zip(a, b))
    else:
        assert a.device.type == b.device.type == "cuda" and a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("spec", [*list_presets(), "chain", "copies"])
def test_output_bytes_equal_the_numpy_sampled_run_on_the_gpu(spec):
    spec = {"chain": GPU_CHAIN, "copies": {"ops": [{"op": "random_crop", "size": [40, 44], "padding": 8}, {"op": "mirror", "vertical": 0.5}, {"op": "pca_color"}], "fill": 50}}.get(spec, spec)
    device = pipelines.build(spec, backend="torch", device="cuda")
    host = Pipeline(resolve(spec), backend="torch", device="cuda", sampling="host")
    assert device.sampling == "device"  # the default on a GPU
    shape = (36, 40, 1) if resolve(spec).name == "lenet5" else (120, 150, 3)
    batch = noise(shape, 16)
    for seed, epoch in [(0, 0), (2**63 + 3, 9)]:
        assert_same_bytes(host(batch, seed=seed, epoch=epoch), device(batch, seed=seed, epoch=epoch))
        on_gpu = torch.from_numpy(batch).cuda()
        assert_same_bytes(host(on_gpu, seed=seed, epoch=epoch), device(on_gpu, seed=seed, epoch=epoch))


def test_mixed_sizes_give_the_same_bytes():
    rng = np.random.default_rng(3)
    batch = [rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8) for h, w in [(64, 80), (50, 50), (64, 80), (90, 70), (50, 50)]]
    for spec in ({"ops": [{"op": "random_resized_crop", "size": 40}, {"op": "mirror"}, {"op": "pca_color"}]},
                 {"ops": [{"op": "rotate", "degrees": 20}, {"op": "resize", "short_side": 36}, {"op": "color_shift"}]}):  # fmt: skip
        host = Pipeline(resolve(spec), backend="torch", device="cuda", sampling="host")
        device = Pipeline(resolve(spec), backend="torch", device="cuda", sampling="device")
        assert_same_bytes(host(batch, seed=2), device(batch, seed=2))


def median_ms(run, rounds=30):
    run(-1)
    run(-2)
    times = []
    for r in range(rounds):
        start = time.perf_counter()
        run(r)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def test_host_time_per_batch_is_small_and_flat_in_the_batch_size():
    spec = pipelines.PipelineSpec.model_validate(CHAIN)

    def host_path(count):
        shapes, ids = np.tile([256, 256, 3], (count, 1)), np.arange(count)
        return lambda r: facts_table(FusedBatch.from_plans(fuse_batch(sample_batch(spec, shapes, 0, r + 10, ids)))).numpy()

    def device_path(count):
        planner, shapes, ids = DevicePlanner(spec, "cuda"), np.tile([256, 256, 3], (count, 1)), np.arange(count)
        return lambda r: planner(shapes, 0, r + 10, ids).facts.cpu()  # through the one device→host copy

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a worker process
    try:
        numpy_256, device_256 = median_ms(host_path(256)), median_ms(device_path(256))
        device_64, device_1024 = median_ms(device_path(64)), median_ms(device_path(1024))
    finally:
        torch.set_num_threads(threads)
    figures = {"numpy 256": numpy_256, "device 64": device_64, "device 256": device_256, "device 1024": device_1024}
    assert device_256 < numpy_256, figures
    assert device_1024 < 2 * device_64 + 0.2, figures  # the numpy path grows ~linearly
