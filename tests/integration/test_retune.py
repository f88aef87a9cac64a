"""Live re-tuning: validated, applied from a stated batch on, every batch carries its version."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import pipelines
from augserve.client import StreamError
from augserve.sources import open_dataset
from conftest import SHAPES, open_stream

SPEC = {"name": "tunable", "ops": [{"op": "random_crop", "size": 32, "padding": 2}, {"op": "rotate", "degrees": 5}]}


def _augmented_here(spec: dict, source, batch, seed: int) -> np.ndarray:
    """What ``spec`` makes of ``batch``'s samples in this process: the worker's computation (uint8 HWC,
    the same (seed, epoch, sample id) draws), on the dataset's own images."""
    ids = batch.sample_ids.tolist()
    pipe = pipelines.build(pipelines.PipelineSpec.model_validate(spec), backend="albumentations")
    return pipe([source.load(i) for i in ids], seed=seed, epoch=batch.epoch, sample_ids=ids).numpy()


def test_update_from_the_trainer_applies_from_the_stated_batch(daemon):
    seed = 4
    with open_stream(daemon.address, pipeline=SPEC, batch_size=16, prefetch=2, ordered=True, shuffle=False, seed=seed) as stream:
        batches = iter(stream)
        first = [next(batches) for _ in range(2)]
        assert {b.pipeline_version for b in first} == {1}
        result = stream.update_pipeline({"rotate.degrees": 25, "random_crop.padding": 0})
        assert result["version"] == 2 and result["from_epoch"] == 0
        assert result["from_index"] >= 2  # batches already issued keep version 1
        rotate = next(op for op in result["spec"]["ops"] if op["op"] == "rotate")
        assert rotate["degrees"] == 25
        rest = list(batches)
        for batch in first + rest:
            expected = 2 if batch.index >= result["from_index"] else 1
            assert batch.pipeline_version == expected, (batch.index, batch.pipeline_version)
    # Each batch is exactly what its version's spec makes of its samples: version 1 the old spec,
    # version 2 the new one (both versions occur: the first two batches are 1, the last is 2).
    assert {b.pipeline_version for b in first + rest} == {1, 2}
    source = open_dataset("shapes", **SHAPES)
    specs = {1: SPEC, 2: result["spec"]}
    for batch in first + rest:
        spec = specs[batch.pipeline_version]
        np.testing.assert_array_equal(batch.images.numpy(), _augmented_here(spec, source, batch, seed), err_msg=f"batch {batch.index}, version {batch.pipeline_version}")
        other = _augmented_here(specs[3 - batch.pipeline_version], source, batch, seed)
        assert not np.array_equal(batch.images.numpy(), other), f"batch {batch.index}: both specs give the same bytes, so the check above proves nothing"


def test_a_refused_update_names_the_field_and_leaves_the_stream_running(daemon):
    with open_stream(daemon.address, pipeline=SPEC, batch_size=16, prefetch=2) as stream:
        batches = iter(stream)
        next(batches)
        with pytest.raises(ValueError, match="rotate.p = 1.5"):
            stream.update_pipeline({"rotate.p": 1.5})
        with pytest.raises(ValueError, match="no 'shear' op"):
            stream.update_pipeline({"shear.degrees": 3})
        remaining = list(batches)
        assert remaining and all(b.pipeline_version == 1 for b in remaining)


def test_tune_set_from_outside_reaches_the_trainer(daemon):
    with open_stream(daemon.address, pipeline=SPEC, batch_size=16, prefetch=2, ordered=True, shuffle=False) as stream:
        batches = iter(stream)
        next(batches)
        env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
        proc = subprocess.run([sys.executable, "-m", "augserve", "tune", "set", "--stream", stream.id, "--address", daemon.address, "rotate.degrees=12", "--json"], capture_output=True, text=True, timeout=60, env=env)
        assert proc.returncode == 0, proc.stderr
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        assert result["version"] == 2
        versions = {b.index: b.pipeline_version for b in batches}
        assert versions[max(versions)] == 2 and stream.version_starts[2] == (result["from_epoch"], result["from_index"])
        bad = subprocess.run([sys.executable, "-m", "augserve", "tune", "set", "--stream", "nope", "--address", daemon.address, "rotate.degrees=12"], capture_output=True, text=True, timeout=60, env=env)
        assert bad.returncode == 2 and "unknown stream 'nope'" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_update_after_the_end_is_refused(daemon):
    stream = open_stream(daemon.address, pipeline=SPEC, batch_size=64)
    list(stream)
    with pytest.raises(StreamError, match="has ended"):
        stream.update_pipeline({"rotate.degrees": 3})
