"""Spec validation: bad specs fail at construction with a message naming the field and the value."""

import json

import pytest
from pydantic import ValidationError

import pipelines
from pipelines import PipelineSpec, format_validation_error


def message_of(spec) -> str:
    with pytest.raises(ValidationError) as info:
        PipelineSpec.model_validate(spec)
    return format_validation_error(info.value)


def test_unknown_op_names_the_tag():
    text = message_of({"ops": [{"op": "twirl", "degrees": 3}]})
    assert "ops[0]" in text and "'twirl'" in text and "mirror" in text


def test_misspelt_parameter_names_the_field():
    text = message_of({"ops": [{"op": "rotate", "degres": 10}]})
    assert "ops[0].rotate.degres" in text and "Extra inputs are not permitted" in text


@pytest.mark.parametrize(
    "op, field, value",
    [
        ({"op": "rotate", "degrees": 10, "p": 1.5}, "p", "1.5"),
        ({"op": "rotate", "degrees": -3}, "degrees", "-3"),
        ({"op": "random_resized_crop", "size": 224, "scale": [0.9, 0.1]}, "scale", "[0.9, 0.1]"),
        ({"op": "mirror", "horizontal": 2}, "horizontal", "2"),
        ({"op": "warp", "magnitude": 0.9}, "magnitude", "0.9"),
        ({"op": "color_shift", "limit": 300}, "limit", "300"),
        ({"op": "random_crop", "size": 0}, "size", "0"),
        ({"op": "resize", "short_side": [300, 200]}, "short_side", "[300, 200]"),
        ({"op": "normalize", "std": [0, 1, 1]}, "std", "[0.0, 1.0, 1.0]"),
    ],
)
def test_out_of_range_values_name_field_and_value(op, field, value):
    text = message_of({"ops": [op]})
    assert text.count("\n") == 0
    assert field in text
    assert value.replace(" ", "") in text.replace(" ", "").replace("(", "[").replace(")", "]")


def test_normalize_must_be_last():
    text = message_of({"ops": [{"op": "normalize"}, {"op": "mirror"}]})
    assert "normalize must appear at most once, as the last op" in text


def test_yaml_and_json_round_trip():
    spec = pipelines.load_preset("alexnet")
    assert PipelineSpec.model_validate(spec.to_yaml()) == spec
    assert PipelineSpec.model_validate(spec.to_json()) == spec
    assert PipelineSpec.model_validate(json.loads(spec.to_json())) == spec


def test_size_int_means_square_and_defaults_apply():
    spec = PipelineSpec.model_validate({"ops": [{"op": "random_crop", "size": 24}, {"op": "mirror"}]})
    assert spec.ops[0].size == (24, 24)
    assert spec.ops[1].horizontal == 0.5 and spec.ops[1].vertical == 0.0


def test_specs_are_frozen():
    spec = pipelines.load_preset("resnet")
    with pytest.raises(ValidationError):
        spec.ops[0].size = (10, 10)


def test_json_schema_lists_every_op():
    schema = json.dumps(PipelineSpec.json_schema())
    for name in pipelines.OP_NAMES:
        assert f'"{name}"' in schema


def test_invalid_yaml_text_is_refused():
    text = message_of("ops: [ {op: mirror")
    assert "not valid YAML" in text


@pytest.mark.parametrize("name", pipelines.list_presets())
def test_every_preset_loads_and_cites_a_source(name):
    from importlib import resources

    spec = pipelines.load_preset(name)
    assert spec.name == name and spec.ops
    text = resources.files("pipelines.presets").joinpath(f"{name}.yaml").read_text()
    assert "Source:" in text


def test_resolve_errors_are_one_line():
    with pytest.raises(ValueError, match="unknown pipeline 'alexnett'"):
        pipelines.resolve("alexnett")
    with pytest.raises(ValueError, match="pipeline file not found"):
        pipelines.resolve("/nonexistent/spec.yaml")
