"""``normalize_images`` on the CPU (look-up tables) gives exactly the bits of the float32 formula
``x * (1/(255 std)) + (-mean/std)`` (then the op's dtype) that the torch path computes on any device:
for every uint8 level, channel count, layout, dtype and input stride."""

import numpy as np
import pytest
import torch

from pipelines.normalize import _normalize_torch, _per_channel, normalize_images
from pipelines.spec import IMAGENET_MEAN, IMAGENET_STD, Normalize

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# (channels, mean, std): RGB with per-channel values, one value broadcast to RGB, grey, and channel
# counts the spec never names but a broadcast value allows (2, RGBA, and more than cv2's 4).
CHANNEL_CASES = [
    (3, IMAGENET_MEAN, IMAGENET_STD),
    (3, (0.5,), (0.25,)),
    (1, (0.1307,), (0.3081,)),
    (2, (0.3,), (0.7,)),
    (4, (0.45,), (0.226,)),
    (6, (0.5,), (0.5,)),
]


def formula(images: torch.Tensor, mean, std, dtype: str, layout: str) -> torch.Tensor:
    """Today's definition, written out: float32 multiply, then float32 add, then the dtype."""
    channels = images.shape[-1]
    mean, std = (list(mean) * channels, list(std) * channels) if len(mean) == 1 else (list(mean), list(std))
    scale = torch.tensor([1.0 / (255.0 * s) for s in std], dtype=torch.float32)
    shift = torch.tensor([-m / s for m, s in zip(mean, std)], dtype=torch.float32)
    out = (images.to(torch.float32) * scale) + shift
    if layout == "NCHW":
        out = out.permute(0, 3, 1, 2).contiguous()
    return out.to(DTYPES[dtype])


def every_level(channels: int, images: int = 3, height: int = 16, width: int = 48) -> torch.Tensor:
    """N×H×W×C uint8 holding every level 0..255 in every channel, at shuffled positions per channel."""
    rng = np.random.default_rng(channels)
    count = images * height * width
    planes = [rng.permutation(np.resize(np.arange(256, dtype=np.uint8), count)) for _ in range(channels)]
    return torch.from_numpy(np.stack(planes, axis=-1).reshape(images, height, width, channels))


def assert_same_bits(out: torch.Tensor, expected: torch.Tensor) -> None:
    assert out.dtype == expected.dtype and out.shape == expected.shape
    width = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[out.dtype]
    assert torch.equal(out.contiguous().view(width), expected.contiguous().view(width))


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("channels, mean, std", CHANNEL_CASES)
def test_every_level_matches_the_formula_bit_for_bit(channels, mean, std, dtype, layout):
    images = every_level(channels)
    op = Normalize(mean=mean, std=std, dtype=dtype, layout=layout)
    out = normalize_images(images, op)
    expected = formula(images, mean, std, dtype, layout)
    assert_same_bits(out, expected)
    assert out.is_contiguous()
    # The torch path (what a CUDA tensor takes) gives the same bits as the CPU look-up.
    assert_same_bits(_normalize_torch(images, *_per_channel(op, channels), dtype, layout), out)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_table_entries_are_the_formula_of_each_level(dtype, layout):
    # One pixel per level, so entry v of channel c is checked on its own.
    levels = torch.arange(256, dtype=torch.uint8).view(1, 16, 16, 1).expand(2, 16, 16, 3)
    op = Normalize(dtype=dtype, layout=layout)
    out = normalize_images(levels, op)
    assert_same_bits(out, formula(levels, IMAGENET_MEAN, IMAGENET_STD, dtype, layout))


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_non_contiguous_inputs(dtype, layout):
    base = every_level(3, images=4, height=24, width=40)
    op = Normalize(dtype=dtype, layout=layout)
    views = {
        "permuted H/W": base.permute(0, 2, 1, 3),
        "column slice": base[:, :, 5:33],
        "every other image": base[::2],
        "channels picked": base[..., [2, 1, 0]].permute(0, 2, 1, 3),
        "from NCHW storage": base.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1),
    }
    for name, view in views.items():
        assert not view.is_contiguous(), name
        assert_same_bits(normalize_images(view, op), formula(view.contiguous(), IMAGENET_MEAN, IMAGENET_STD, dtype, layout))


def test_large_batch_spans_several_chunks():
    images = every_level(3, images=21, height=128, width=96)  # more pixels than one look-up chunk
    for layout in ("NCHW", "NHWC"):
        out = normalize_images(images, Normalize(layout=layout))
        assert_same_bits(out, formula(images, IMAGENET_MEAN, IMAGENET_STD, "float32", layout))


@pytest.mark.parametrize("layout, shape", [("NCHW", (0, 3, 8, 10)), ("NHWC", (0, 8, 10, 3))])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_empty_batch(dtype, layout, shape):
    out = normalize_images(torch.zeros((0, 8, 10, 3), dtype=torch.uint8), Normalize(dtype=dtype, layout=layout))
    assert out.shape == shape and out.dtype == DTYPES[dtype]


def test_output_owns_fresh_memory():
    images = every_level(3)
    op = Normalize()
    first = normalize_images(images, op)
    kept = first.clone()
    second = normalize_images(images, op)
    second.fill_(0)
    assert torch.equal(first, kept)  # a later call never writes into an earlier result


@pytest.mark.parametrize(
    "images, error, message",
    [
        (torch.zeros((2, 8, 8, 3), dtype=torch.float32), TypeError, "normalize expects a uint8 N×H×W×C tensor, got torch.float32 of shape (2, 8, 8, 3)"),
        (torch.zeros((8, 8, 3), dtype=torch.uint8), TypeError, "normalize expects a uint8 N×H×W×C tensor, got torch.uint8 of shape (8, 8, 3)"),
        (torch.zeros((2, 8, 8, 2), dtype=torch.uint8), ValueError, "normalize has 3 mean/std values but the images have 2 channels"),
        (torch.zeros((0, 8, 8, 4), dtype=torch.uint8), ValueError, "normalize has 3 mean/std values but the images have 4 channels"),
    ],
)
def test_bad_input_messages(images, error, message):
    with pytest.raises(error) as info:
        normalize_images(images, Normalize())
    assert str(info.value) == message
