"""Changing spec fields by path (live re-tuning and tuning studies)."""

import pytest
from pydantic import ValidationError

import pipelines
from pipelines.changes import apply_changes, locate, parse_assignments


def test_paths_by_name_index_and_element():
    spec = pipelines.load_preset("resnet")
    changed = apply_changes(spec, {"random_resized_crop.scale.0": 0.3, "1.horizontal": 0.2, "pca_color.alpha_std": 0.05})
    assert changed.ops[0].scale == (0.3, 1.0) and changed.ops[1].horizontal == 0.2 and changed.ops[2].alpha_std == 0.05
    assert spec.ops[0].scale == (0.08, 1.0)  # the original is untouched


@pytest.mark.parametrize(
    "path, match",
    [
        ("rotate.degrees", "has no 'rotate' op"),
        ("mirror.horizontl", "mirror has no field 'horizontl'"),
        ("mirror.op", "mirror has no field 'op'"),
        ("9.degrees", "the pipeline has 4 ops"),
        ("mirror.horizontal.0", "is not a list to index"),
        ("random_resized_crop.scale.2", "has 2 values"),
        ("degrees", "expected op.field"),
    ],
)
def test_bad_paths_are_named(path, match):
    with pytest.raises(ValueError, match=match):
        locate(pipelines.load_preset("resnet"), path)


def test_out_of_range_change_is_refused_by_the_spec_bounds():
    with pytest.raises(ValidationError, match="less than or equal to 1"):
        apply_changes(pipelines.load_preset("resnet"), {"mirror.horizontal": 1.5})


def test_parse_assignments_reads_yaml_values():
    assert parse_assignments(["rotate.degrees=20", "random_resized_crop.scale=[0.2, 1.0]", "x.y=abc"]) == {"rotate.degrees": 20, "random_resized_crop.scale": [0.2, 1.0], "x.y": "abc"}
    with pytest.raises(ValueError, match="op.field=value"):
        parse_assignments(["rotate.degrees"])
