"""Bad images are refused with one clear error naming the problem."""

import numpy as np
import pytest
import torch

import pipelines


@pytest.fixture(scope="module")
def pipe():
    return pipelines.build({"ops": [{"op": "mirror"}]})


def test_wrong_dtype(pipe):
    with pytest.raises(TypeError, match="images must be uint8.*float32"):
        pipe(np.zeros((2, 8, 8, 3), np.float32))


def test_wrong_channel_count(pipe):
    with pytest.raises(ValueError, match="1 or 3 channels.*got 4"):
        pipe(np.zeros((2, 8, 8, 4), np.uint8))


@pytest.mark.parametrize("empty", [np.zeros((0, 8, 8, 3), np.uint8), [], torch.zeros((0, 8, 8, 3), dtype=torch.uint8)])
def test_empty_batch(pipe, empty):
    with pytest.raises(ValueError, match="empty batch"):
        pipe(empty)


def test_list_with_a_bad_member_names_its_index(pipe):
    with pytest.raises(TypeError, match="image 1: images must be uint8"):
        pipe([np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 3), np.int16)])


def test_grey_images_without_channel_axis_are_accepted(pipe):
    out = pipe(np.zeros((2, 8, 8), np.uint8))
    assert tuple(out.shape) == (2, 8, 8, 1)


def test_mixed_sizes_come_back_as_a_list(pipe):
    out = pipe([np.zeros((8, 8, 3), np.uint8), np.zeros((6, 10, 3), np.uint8)])
    assert isinstance(out, list) and tuple(out[1].shape) == (6, 10, 3)


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend 'opencv'"):
        pipelines.build("alexnet", backend="opencv")
