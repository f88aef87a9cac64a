"""Stream fingerprints: a resume position is refused for another run, naming every differing field;
a saved fingerprint from a peer can be anything and only ever yields ValueError."""

import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pipelines
from augserve.fingerprint import FINGERPRINT_FIELDS, check_fingerprint, stream_fingerprint

BASE = dict(dataset="digits", split="train", dataset_options={"size": 32}, pipeline="lenet5", seed=0, batch_size=64, world_size=2, rank=1, shuffle=True, drop_last=False, num_samples=1437)


def nested(depth):
    value = 1
    for _ in range(depth):
        value = [value]
    return value


def fingerprint(**changes):
    return stream_fingerprint(**{**BASE, **changes})


def test_plain_json_with_exactly_the_fields():
    fp = fingerprint(dataset_options={"sizes": (1, 2)})
    assert tuple(fp) == FINGERPRINT_FIELDS
    assert json.loads(json.dumps(fp)) == fp and fp["dataset_options"] == {"sizes": [1, 2]}
    assert fp["pipeline"]["name"] == "lenet5" and re.fullmatch(r"[0-9a-f]{16}", fp["pipeline"]["digest"])
    check_fingerprint(fp, fingerprint(dataset_options={"sizes": [1, 2]}))  # same run: no error


def test_pipeline_digest_is_stable_and_ignores_the_name():
    spec = pipelines.resolve("lenet5").to_dict()
    by_name, written_out = fingerprint()["pipeline"], fingerprint(pipeline=spec)["pipeline"]
    renamed = fingerprint(pipeline={**spec, "name": "mine"})["pipeline"]
    minimal = {"ops": spec["ops"]}  # defaults left out: the validated spec is what is hashed
    assert by_name["digest"] == written_out["digest"] == renamed["digest"] == fingerprint(pipeline=minimal)["pipeline"]["digest"]
    assert renamed["name"] == "mine" and fingerprint(pipeline=minimal)["pipeline"]["name"] is None
    other = {**spec, "ops": spec["ops"][1:]}
    assert fingerprint(pipeline=other)["pipeline"]["digest"] != by_name["digest"]


def test_every_differing_field_is_named_with_both_values():
    saved = fingerprint()
    current = fingerprint(batch_size=128, seed=1, shuffle=False, dataset_options={"size": 28}, rank=0, pipeline="alexnet")
    with pytest.raises(ValueError) as info:
        check_fingerprint(saved, current)
    message = str(info.value)
    assert message.startswith("resume state was saved by another run: ") and "\n" not in message
    assert "batch_size 64 != 128" in message and "seed 0 != 1" in message and "shuffle True != False" in message
    assert "rank 1 != 0" in message and 'dataset_options {"size":32} != {"size":28}' in message
    assert re.search(r"pipeline lenet5@[0-9a-f]{16} != alexnet@[0-9a-f]{16}", message)
    for unchanged in ("dataset ", "split", "world_size", "drop_last", "num_samples"):
        assert unchanged not in message


@pytest.mark.parametrize("field, value", [("dataset", "cifar10"), ("split", "test"), ("world_size", 4), ("drop_last", True), ("num_samples", 1000)])
def test_each_field_alone_is_detected(field, value):
    with pytest.raises(ValueError, match=rf"saved by another run: {field} \S+ != \S+$"):
        check_fingerprint(fingerprint(), fingerprint(**{field: value}))


def test_option_types_matter():
    with pytest.raises(ValueError, match="dataset_options"):
        check_fingerprint(fingerprint(dataset_options={"size": 32}), fingerprint(dataset_options={"size": 32.0}))


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda fp: fp.pop("seed"), "seed: Field required"),
        (lambda fp: fp.update(extra=1), "extra: Extra inputs are not permitted"),
        (lambda fp: fp.update(batch_size="64"), "batch_size: Input should be a valid integer"),
        (lambda fp: fp.update(seed=True), "seed: Input should be a valid integer"),
        (lambda fp: fp.update(shuffle=1), "shuffle: Input should be a valid boolean"),
        (lambda fp: fp.update(rank=5), "rank 5 is outside world_size 2"),
        (lambda fp: fp.update(pipeline={"name": "x", "digest": "zz"}), "pipeline.digest"),
        (lambda fp: fp.update(dataset_options={"a": nested(20)}), "levels"),
        (lambda fp: fp.update(dataset_options={"a": float("nan")}), "finite"),
        (lambda fp: fp.update(dataset_options={1: 2}), "dataset_options"),
    ],
)
def test_malformed_saved_fingerprints_are_value_errors(mutate, message):
    saved = fingerprint()
    mutate(saved)
    with pytest.raises(ValueError, match="^resume fingerprint is malformed: ") as info:
        check_fingerprint(saved, fingerprint())
    assert message in str(info.value) and "\n" not in str(info.value)


def test_hostile_sizes_are_bounded():
    deep = nested(100_000)  # far beyond the recursion limit
    huge_key = {"k" * 10_000_000: 1}
    for options in (deep, {"a": deep}, huge_key, {str(i): i for i in range(100_000)}):
        saved = {**fingerprint(), "dataset_options": options}
        with pytest.raises(ValueError) as info:
            check_fingerprint(saved, fingerprint())
        assert len(str(info.value)) < 2000
    with pytest.raises(ValueError, match="must be a mapping"):
        check_fingerprint([1, 2], fingerprint())
    with pytest.raises(ValueError) as info:
        check_fingerprint({"x" * 10**6: 1, (1, 2): 2, 10**5000: 3}, fingerprint())
    assert len(str(info.value)) < 2000


def test_stream_fingerprint_refuses_bad_arguments():
    with pytest.raises(ValueError, match="does not open spec files"):
        fingerprint(pipeline="augment.yaml")
    with pytest.raises(ValueError, match="unknown pipeline"):
        fingerprint(pipeline="no-such-preset")
    with pytest.raises(ValueError, match="dataset_options: values must be plain JSON"):
        fingerprint(dataset_options={"f": object()})
    with pytest.raises(ValueError, match="batch_size"):
        fingerprint(batch_size=0)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
field_names = st.sampled_from(FINGERPRINT_FIELDS) | st.text(max_size=12)


@settings(max_examples=300, deadline=None)
@given(saved=st.dictionaries(field_names, json_values, max_size=14))
def test_fuzz_arbitrary_saved_values_only_raise_value_error(saved):
    try:
        check_fingerprint(saved, fingerprint())
    except ValueError as exc:
        assert "\n" not in str(exc) and len(str(exc)) < 2000


@settings(max_examples=300, deadline=None)
@given(changes=st.dictionaries(st.sampled_from(FINGERPRINT_FIELDS), json_values, max_size=4))
def test_fuzz_near_valid_saved_values_only_raise_value_error(changes):
    try:
        check_fingerprint({**fingerprint(), **changes}, fingerprint())
    except ValueError as exc:
        assert "\n" not in str(exc) and len(str(exc)) < 2000
