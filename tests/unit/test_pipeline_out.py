"""``out=``: a pipeline writes its batch into the caller's tensor — the same bytes as without it, in place
(no temporary and copy on the albumentations backend), and one clear line for every misuse."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

import pipelines
from numpy.lib.array_utils import byte_bounds

from pipelines.backends import opencv_kernels as K

FULL_CHAIN = {
    "ops": [
        {"op": "random_resized_crop", "size": 48},
        {"op": "mirror", "horizontal": 0.5, "vertical": 0.3},
        {"op": "rotate", "degrees": 15, "p": 0.7},
        {"op": "shear", "degrees": 10, "p": 0.5},
        {"op": "warp", "kind": "elastic", "magnitude": 0.03, "p": 0.5},
        {"op": "pca_color"},
        {"op": "color_shift", "limit": 15},
    ]
}
COLOR_FIRST = {"ops": [{"op": "color_shift", "limit": 60}, {"op": "rotate", "degrees": 20}, {"op": "center_crop", "size": 40}]}
CROP_FLIP = {"ops": [{"op": "random_crop", "size": 40}, {"op": "mirror"}]}  # integer windows and flips: the copy path
SPECS = {**{f"preset:{name}": pipelines.load_preset(name).without_normalize() for name in pipelines.list_presets()},
         "full_chain": FULL_CHAIN, "color_first": COLOR_FIRST, "crop_flip": CROP_FLIP}  # fmt: skip
IDS = [3, 17, 40, 41, 99, 1000]


def images_for(spec) -> list[np.ndarray]:
    """Six noise images of two sizes; grey and small for LeNet's digits."""
    rng = np.random.default_rng(11)
    grey = "lenet5" in str(getattr(spec, "name", ""))
    shapes = [(36, 36, 1)] * 6 if grey else [(70, 90, 3), (90, 70, 3)] * 3
    return [rng.integers(0, 256, shape, dtype=np.uint8) for shape in shapes]


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "step_by_step"])
@pytest.mark.parametrize("name", sorted(SPECS))
def test_out_holds_the_bytes_of_a_call_without_it(name, fused):
    pipe = pipelines.build(SPECS[name], fused=fused)
    images = images_for(pipe.spec)
    expected = pipe(images, seed=4, epoch=2, sample_ids=IDS)
    out = torch.full(tuple(expected.shape), 77, dtype=torch.uint8)
    result = pipe(images, seed=4, epoch=2, sample_ids=IDS, out=out)
    assert result is out and result.data_ptr() == out.data_ptr()
    assert torch.equal(out, expected)


class KernelSpy:
    """Wraps the OpenCV kernels: records, for every call that was given a destination, whether the
    result is that destination's memory, and which destinations were written."""

    KERNELS = ("copy_window", "warp_window", "warp_affine", "remap", "apply_color")

    def __init__(self, monkeypatch) -> None:
        self.targets: list[int] = []
        self.elsewhere: list[str] = []
        for name in self.KERNELS:
            monkeypatch.setattr(K, name, self._wrap(name, getattr(K, name)))

    def _wrap(self, name, kernel):
        signature = inspect.signature(kernel)

        def spied(*args, **kwargs):
            out = signature.bind(*args, **kwargs).arguments.get("out")
            result = kernel(*args, **kwargs)
            if isinstance(out, np.ndarray) and result is not None:
                self.targets.append(out.__array_interface__["data"][0])
                if byte_bounds(result) != byte_bounds(out):
                    self.elsewhere.append(name)
            return result

        return spied


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "step_by_step"])
@pytest.mark.parametrize("name", ["full_chain", "color_first", "crop_flip", "preset:alexnet", "preset:lenet5"])
def test_every_row_is_written_in_place_by_its_kernel(monkeypatch, name, fused):
    pipe = pipelines.build(SPECS[name], fused=fused)
    images = images_for(pipe.spec)
    shape = tuple(pipe(images, seed=1, sample_ids=IDS).shape)
    spy = KernelSpy(monkeypatch)
    out = torch.zeros(shape, dtype=torch.uint8)
    pipe(images, seed=1, sample_ids=IDS, out=out)
    rows = [out.data_ptr() + index * out[0].numel() for index in range(shape[0])]
    assert spy.elsewhere == [], f"kernels that wrote elsewhere (a temporary, then a copy): {spy.elsewhere}"
    # (unfused, the passes before the last write into the backend's own arrays, not into out)
    into_out = sorted(target for target in spy.targets if out.data_ptr() <= target < out.data_ptr() + out.numel())
    assert into_out == rows, "each row of out is the destination of exactly one kernel call"


def test_run_decoding_writes_into_out_and_asks_for_it_before_decoding():
    images = images_for(None)
    shapes = [image.shape for image in images]
    events = []

    def decode(index, box, max_factor):
        events.append("decode")
        return images[index], (1, 0, 0)

    for decode_mode in ("fast", "exact"):
        pipe = pipelines.build({**FULL_CHAIN, "decode": decode_mode})
        expected = pipe(images, seed=6, sample_ids=IDS)
        events.clear()
        holder = {}

        def allocate(shape):
            events.append(("allocate", shape))
            holder["out"] = torch.empty(shape, dtype=torch.uint8)
            return holder["out"]

        result = pipe.run_decoding(shapes, decode, seed=6, sample_ids=IDS, out=allocate)
        assert events[0] == ("allocate", (6, 48, 48, 3)) and events[1:] == ["decode"] * 6
        assert result is holder["out"] and torch.equal(result, expected)


def test_apply_replays_into_out():
    pipe = pipelines.build(FULL_CHAIN)
    images = images_for(None)
    params = pipe.sample_params([i.shape for i in images], seed=2, sample_ids=IDS)
    out = torch.empty((6, 48, 48, 3), dtype=torch.uint8)
    assert pipe.apply(images, params, out=out) is out
    assert torch.equal(out, pipe(images, seed=2, sample_ids=IDS))


def test_the_torch_backend_copies_into_out_once():
    pipe = pipelines.build(FULL_CHAIN, backend="torch")
    images = images_for(None)
    out = torch.empty((6, 48, 48, 3), dtype=torch.uint8)
    assert pipe(images, seed=3, sample_ids=IDS, out=out) is out
    assert torch.equal(out, pipe(images, seed=3, sample_ids=IDS))


def _one_line(excinfo) -> str:
    text = str(excinfo.value)
    assert "\n" not in text
    return text


@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda: np.zeros((6, 48, 48, 3), np.uint8), TypeError, "out= must be a torch.uint8 tensor of shape 6×48×48×3 (N×H×W×C) or a callable returning one, got ndarray (wrap a numpy array with torch.from_numpy)"),
        (lambda: torch.zeros((6, 48, 48, 3), dtype=torch.float32), TypeError, "out= must have dtype torch.uint8, got torch.float32"),
        (lambda: torch.zeros((6, 48, 48, 3), dtype=torch.uint8, device="meta"), ValueError, "out= must be on the CPU, got a tensor on meta"),
        (lambda: torch.zeros((5, 48, 48, 3), dtype=torch.uint8), ValueError, "out= has shape 5×48×48×3, but this batch's outputs are 6×48×48×3 (N×H×W×C)"),
        (lambda: torch.zeros((6, 48, 48, 3), dtype=torch.uint8).permute(0, 2, 1, 3), ValueError, "out= must be C-contiguous"),
        (lambda: (lambda shape: torch.zeros(shape[::-1], dtype=torch.uint8)), ValueError, "out= has shape 3×48×48×6"),
    ],
    ids=["numpy", "float", "meta_device", "shape", "strides", "callable_shape"],
)
def test_a_bad_out_is_one_line_before_any_pixel_work(monkeypatch, make, error, message):
    pipe = pipelines.build(FULL_CHAIN)
    monkeypatch.setattr(pipe.backend, "run", lambda *a, **k: pytest.fail("the backend ran although out= was bad"))
    with pytest.raises(error) as excinfo:
        pipe(images_for(None), seed=0, sample_ids=IDS, out=make())
    assert message in _one_line(excinfo)


def test_a_normalize_spec_is_refused_with_out():
    pipe = pipelines.build("resnet")
    with pytest.raises(ValueError) as excinfo:
        pipe(images_for(None), out=torch.empty((6, 224, 224, 3), dtype=torch.uint8))
    assert _one_line(excinfo).startswith("out= takes uint8 outputs, but this spec ends with normalize (float output)")


def test_outputs_of_different_sizes_are_refused_with_out():
    pipe = pipelines.build({"ops": [{"op": "resize", "short_side": 32}]})
    images = images_for(None)  # 70×90 and 90×70: 32×41 and 41×32
    with pytest.raises(ValueError) as excinfo:
        pipe(images, out=lambda shape: pytest.fail("no destination is asked for when the outputs differ in size"))
    assert _one_line(excinfo) == (
        "out= needs outputs of one size, but this batch's differ (32×41×3 and 41×32×3): add a crop or resize op to the pipeline so a batch can be stacked"
    )
