"""The interleaved timing of every benchmark: each candidate once per round, the order alternating."""

from augserve.bench.timing import interleaved, round_order


def test_rounds_alternate_forwards_and_backwards():
    candidates = {"a": None, "b": None, "c": None}
    assert [name for name, _ in round_order(candidates, 0)] == ["a", "b", "c"]
    assert [name for name, _ in round_order(candidates, 1)] == ["c", "b", "a"]
    assert [name for name, _ in round_order(candidates, 2)] == ["a", "b", "c"]


def test_each_candidate_runs_once_per_round_after_the_warm_up():
    calls = []

    def candidate(name):
        def run(round_index):
            calls.append((name, round_index))
            return 8

        return run

    result = interleaved({"a": candidate("a"), "b": candidate("b")}, rounds=3, warmup=1)
    assert calls == [("a", -1), ("b", -1), ("a", 0), ("b", 0), ("b", 1), ("a", 1), ("a", 2), ("b", 2)]
    assert set(result) == {"a", "b"}
    for measured in result.values():
        assert len(measured["runs"]) == 3 and all(rate > 0 for rate in measured["runs"])
        assert measured["images_per_s"] == sorted(measured["runs"])[1]
