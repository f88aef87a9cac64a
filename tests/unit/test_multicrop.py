"""Ten-crop evaluation (AlexNet §4.1): the exact ten views of ``ten_crops`` and their averaging in ``predict``."""

from types import SimpleNamespace

import pytest
import torch

from trainer.loop import Precision, predict, ten_crops


def arange_images(n: int, c: int, h: int, w: int) -> torch.Tensor:
    """N×C×H×W float32 batch in which every pixel of every image and channel holds a different value."""
    return torch.arange(n * c * h * w, dtype=torch.float32).reshape(n, c, h, w)


def expected_views(images: torch.Tensor, h: int, w: int) -> list[torch.Tensor]:
    """The documented order, written out by hand: top-left, top-right, bottom-left, bottom-right, centre
    (offset rounded down when the margin is odd), then the same five mirrored left-right."""
    H, W = images.shape[-2:]
    top, left = (H - h) // 2, (W - w) // 2
    five = [
        images[:, :, :h, :w],
        images[:, :, :h, W - w :],
        images[:, :, H - h :, :w],
        images[:, :, H - h :, W - w :],
        images[:, :, top : top + h, left : left + w],
    ]
    mirrored = [view[..., torch.arange(w - 1, -1, -1)] for view in five]  # column j ← column w-1-j
    return five + mirrored


@pytest.mark.parametrize(
    "full, size",
    [
        ((8, 8), (4, 4)),  # even margins: centre exactly in the middle
        ((9, 11), (4, 4)),  # odd margins in both directions
        ((7, 10), (3, 6)),  # non-square crop, odd margin in height, even in width
        ((6, 9), (5, 2)),  # height margin 1, width margin 7
        ((36, 36), (32, 32)),  # the digits run: 32×32 crops of a 36×36 padded image
    ],
)
def test_ten_views_are_the_corners_centre_and_their_mirrors_in_order(full, size):
    images = arange_images(3, 2, *full)
    views = ten_crops(size)(images)
    assert len(views) == 10
    for index, (got, want) in enumerate(zip(views, expected_views(images, *size))):
        assert got.shape == (3, 2, *size), index
        assert torch.equal(got, want), index
    # Each sample's views come from that sample only (no mixing across the batch).
    for sample in range(3):
        alone = ten_crops(size)(images[sample : sample + 1])
        assert all(torch.equal(a[0], v[sample]) for a, v in zip(alone, views))


def test_ten_views_are_distinct_when_the_image_is_larger_in_both_directions():
    views = ten_crops((4, 5))(arange_images(1, 1, 9, 8))
    assert len({tuple(v.flatten().tolist()) for v in views}) == 10


def test_corner_and_centre_positions_on_a_known_image():
    # One 1×1×4×5 image with values 0..19 in row-major order; 2×3 crops; margins 2 and 2 (centre at 1, 1).
    image = arange_images(1, 1, 4, 5)
    views = [v[0, 0].tolist() for v in ten_crops((2, 3))(image)]
    assert views[0] == [[0, 1, 2], [5, 6, 7]]  # top-left
    assert views[1] == [[2, 3, 4], [7, 8, 9]]  # top-right
    assert views[2] == [[10, 11, 12], [15, 16, 17]]  # bottom-left
    assert views[3] == [[12, 13, 14], [17, 18, 19]]  # bottom-right
    assert views[4] == [[6, 7, 8], [11, 12, 13]]  # centre
    assert views[5] == [[2, 1, 0], [7, 6, 5]]  # mirrors, same order
    assert views[9] == [[8, 7, 6], [13, 12, 11]]


def test_same_size_gives_the_image_and_its_mirror():
    images = arange_images(2, 3, 5, 6)
    views = ten_crops((5, 6))(images)
    assert all(torch.equal(v, images) for v in views[:5])
    assert all(torch.equal(v, images.flip(-1)) for v in views[5:])


@pytest.mark.parametrize("full", [(3, 8), (8, 3), (3, 3)])
def test_images_smaller_than_the_crop_are_refused(full):
    with pytest.raises(ValueError, match=rf"larger than 4x4, got {full[0]}x{full[1]}"):
        ten_crops((4, 4))(arange_images(1, 1, *full))


class RecordingModel(torch.nn.Module):
    """Logits = per-channel means of each view (2 classes for 2 channels); records every input shape."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple] = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.shapes.append(tuple(images.shape))
        return images.mean(dim=(2, 3))


def test_predict_averages_the_softmax_of_all_ten_views():
    torch.manual_seed(0)
    images = torch.randn(4, 2, 7, 6)
    labels = torch.tensor([0, 1, 1, 0])
    batch = SimpleNamespace(images=images, labels=labels)
    model = RecordingModel()
    probabilities, got_labels = predict(model, [batch], Precision(torch.device("cpu")), ten_crops((5, 4)))
    assert model.shapes == [(4, 2, 5, 4)] * 10
    want = torch.stack([view.mean(dim=(2, 3)).softmax(1) for view in expected_views(images, 5, 4)]).mean(0)
    torch.testing.assert_close(probabilities, want, rtol=1e-6, atol=1e-7)
    assert torch.equal(got_labels, labels)
    # Not the same as the single (centre) view alone: the other nine views do count.
    single, _ = predict(model, [batch], Precision(torch.device("cpu")), lambda x: [ten_crops((5, 4))(x)[4]])
    assert not torch.allclose(single, probabilities, atol=1e-3)
