"""DALI's own pipeline of a chain (the baseline of ``augserve bench gpu``), on DALI's CPU operators:
its wiring exactly where the ops leave nothing to chance, and its parameter ranges statistically."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("nvidia.dali")

from augserve.bench import dali_chain  # noqa: E402
from augserve.bench.gpu_candidates import GPU_CHAIN  # noqa: E402
from pipelines.spec import IMAGENET_EIGVAL, IMAGENET_EIGVEC, PipelineSpec  # noqa: E402

SIDE = 224
WHOLE = {"op": "random_resized_crop", "size": SIDE, "scale": [1.0, 1.0], "ratio": [1.0, 1.0]}  # the whole square image, unscaled
RAW = {"op": "normalize", "mean": [0.0], "std": [1.0 / 255.0], "dtype": "float32", "layout": "NCHW"}  # x/255*255: the uint8 levels as floats


def run(ops: list[dict], images: np.ndarray, seed: int = 0) -> np.ndarray:
    """One batch of ``images`` through DALI's own pipeline of ``ops``: float32 N×H×W×C."""
    pipe = dali_chain.build({"ops": ops}, len(images), "cpu", 1, seed=seed, images=images)
    out = pipe.run()[0].as_tensor()
    return np.array(out).transpose(0, 2, 3, 1)


def noise(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, SIDE, SIDE, 3), dtype=np.uint8)


def test_the_whole_image_comes_through_exactly_and_mirrored_when_asked():
    images = noise(4)
    np.testing.assert_array_equal(run([WHOLE, {"op": "mirror", "horizontal": 0.0}, RAW], images), images.astype(np.float32))
    np.testing.assert_array_equal(run([WHOLE, {"op": "mirror", "horizontal": 1.0}, RAW], images), images[:, :, ::-1].astype(np.float32))


def test_normalize_uses_the_chain_mean_std_dtype_and_layout():
    images = noise(2)
    pipe = dali_chain.build({"ops": [WHOLE, {"op": "normalize", "dtype": "float16"}]}, 2, "cpu", 1, images=images)
    out = pipe.run()[0].as_tensor()
    assert out.shape() == [2, 3, SIDE, SIDE] and str(out.dtype) == "DALIDataType.FLOAT16"
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    expected = ((images / 255.0 - mean) / std).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(np.array(out, dtype=np.float32), expected, atol=4e-3)


def test_the_color_shift_draws_one_offset_per_image_and_channel_within_its_limit():
    grey = np.full((48, SIDE, SIDE, 3), 128, np.uint8)
    out = run([WHOLE, {"op": "color_shift", "limit": 20}, RAW], grey)
    offsets = out.reshape(48, -1, 3) - 128.0
    assert np.all(offsets.std(axis=1) == 0.0)  # one offset for every pixel of an image and channel
    drawn = offsets[:, 0, :]
    assert np.abs(drawn).max() <= 20.0 and drawn.max() - drawn.min() > 30.0  # uniform in ±20 (rounded): spread wide
    assert np.all(run([WHOLE, {"op": "color_shift", "limit": 20, "p": 0.0}, RAW], grey) == 128.0)


def test_pca_lighting_moves_pixels_along_the_first_eigenvector_with_the_alpha_std():
    grey = np.full((96, SIDE, SIDE, 3), 128, np.uint8)
    offsets = run([WHOLE, {"op": "pca_color", "alpha_std": 0.1}, RAW], grey)[:, 0, 0, :] - 128.0
    first = np.asarray(IMAGENET_EIGVEC)[:, 0]
    alpha = offsets @ first / (IMAGENET_EIGVAL[0] * 255.0)  # the other components move a pixel by < 1.5 levels
    assert 0.07 < alpha.std() < 0.13 and abs(alpha.mean()) < 0.04


def test_rotation_pulls_zero_fill_into_the_corners_and_keeps_the_centre():
    white = np.full((32, SIDE, SIDE, 3), 255, np.uint8)
    out = run([WHOLE, {"op": "rotate", "degrees": 15}, RAW], white)
    assert np.all(out[:, SIDE // 2, SIDE // 2] == 255.0)
    assert (out[:, 0, 0, 0] < 255.0).mean() > 0.8  # all but the nearly unrotated images
    assert np.all(run([WHOLE, {"op": "rotate", "degrees": 15, "p": 0.0}, RAW], white) == 255.0)


def test_the_bench_chain_builds_and_makes_normalized_batches_from_jpeg_files(tmp_path):
    from augserve.bench.photo_folder import WEB_SIZE, write_photo_folder

    described = write_photo_folder(tmp_path / "photos", 4, sizes=WEB_SIZE)
    files = sorted(str(path) for path in (tmp_path / "photos").rglob("*.jpg"))
    assert len(files) == described["images"] == 4
    out = dali_chain.build(GPU_CHAIN, 4, "cpu", 1, files=files).run()[0].as_tensor()
    assert out.shape() == [4, 3, SIDE, SIDE] and str(out.dtype) == "DALIDataType.FLOAT16"
    values = np.array(out, dtype=np.float32)
    assert np.isfinite(values).all() and values.std() > 0.3


@pytest.mark.parametrize(
    ("ops", "message"),
    [
        ([{"op": "mirror"}], "DALI's own pipeline here starts with random_resized_crop"),
        ([WHOLE, {"op": "warp"}], "DALI's own pipeline here has no warp"),
        ([WHOLE, {"op": "rotate", "degrees": 5}, {"op": "rotate", "degrees": 5}], "DALI's own pipeline here takes each op at most once"),
        ([WHOLE, {"op": "mirror", "vertical": 0.5}], "DALI's own pipeline here flips left-right only (crop_mirror_normalize)"),
        ([WHOLE, {"op": "normalize", "layout": "NHWC"}], "DALI's own pipeline here normalizes to NCHW only"),
    ],
)
def test_a_chain_it_cannot_express_is_refused_in_one_line(ops, message):
    with pytest.raises(ValueError) as info:
        dali_chain.check_chain(PipelineSpec.model_validate({"ops": ops}))
    assert str(info.value) == message


def test_it_takes_images_or_files_and_labels_only_one_per_file():
    with pytest.raises(ValueError, match="give images or files, not both"):
        dali_chain.build(GPU_CHAIN, 2, "cpu", 1)
    with pytest.raises(ValueError, match="labels go with files, one each"):
        dali_chain.build(GPU_CHAIN, 2, "cpu", 1, files=["a.jpg", "b.jpg"], labels=[0])
    with pytest.raises(ValueError, match="labels go with files, one each"):
        dali_chain.build(GPU_CHAIN, 2, "cpu", 1, images=noise(2), labels=[0, 1])


def test_a_dali_block_makes_exactly_its_batches_and_leaves_none_in_flight():
    """``bench gpu`` drives DALI one batch ahead within a block and takes the last one inside it: k
    runs read k batches' input (after the untimed prefetch at build), and nothing is scheduled after."""
    from augserve.bench.gpu_candidates import _dali_candidate

    fed = []
    images = noise(2)

    def source():
        fed.append(1)
        return images

    def build():
        from nvidia.dali import fn, pipeline_def

        @pipeline_def
        def pipe():
            return fn.external_source(source=source, batch=True, layout="HWC")

        built = pipe(batch_size=2, num_threads=1, device_id=None)
        built.build()
        return built

    candidate = _dali_candidate("probe", "", build)
    prefetched = len(fed)
    for block in range(3):
        for index in range(4):
            candidate.run(index)
        candidate.finish()
        assert len(fed) == prefetched + 4 * (block + 1)


def grey_and_white_folder(root, per_class: int = 6):
    """A two-class image folder of plain 64×48 JPEGs: class ``a_grey`` (level 128) and ``b_white`` (255)."""
    import cv2

    for name, level in (("a_grey", 128), ("b_white", 255)):
        (root / name).mkdir(parents=True)
        for index in range(per_class):
            cv2.imwrite(str(root / name / f"{index}.jpg"), np.full((48, 64, 3), level, np.uint8))
    return root


def test_the_trainer_benches_dali_loader_runs_the_whole_preset_with_each_files_label(tmp_path):
    """``trainer.bench.loaders.dali_batches`` is this graph on a folder's files: labels from the folder,
    and the preset's PCA lighting applied (plain images come out in several colours, not one)."""
    import torch

    from trainer.bench.loaders import bench_spec, dali_batches

    root = grey_and_white_folder(tmp_path / "plain")
    spec = bench_spec("resnet", 32).to_dict()
    images, labels = next(dali_batches(str(root), {}, spec, 12, 1, seed=3))
    assert images.shape == (12, 3, 32, 32) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and sorted(labels.tolist()) == [0] * 6 + [1] * 6  # one epoch's batch: every file once
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (spec["ops"][-1]["mean"], spec["ops"][-1]["std"]))
    levels = (images * std + mean) * 255.0  # back to the 0–255 scale
    per_image = levels.mean(dim=(2, 3))  # N×3
    grey, white = per_image[labels == 0], per_image[labels == 1]
    assert (grey - 128.0).abs().max() < 20 and (white > 230).all()  # PCA moves a level by a few units only
    assert grey.std(dim=0).min() > 0.5  # and by a different amount in each image: PCA lighting ran
    # Within an image every pixel moves alike: the offset is per image, the crop of a plain image plain.
    assert (levels[labels == 0] - per_image[labels == 0][:, :, None, None]).abs().max() < 1.0


def test_a_preset_the_dali_graph_cannot_express_makes_the_gpu_e2e_dali_row_unavailable_with_the_reason():
    from trainer.bench.gpu_e2e import dali_unavailable
    from trainer.bench.loaders import bench_spec

    assert dali_unavailable(bench_spec("vgg").to_dict()) == "DALI's own pipeline here starts with random_resized_crop"
    assert dali_unavailable(bench_spec("resnet", 32).to_dict()) is None
