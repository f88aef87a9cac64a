"""Reorderer: duplicates dropped, plan order (ordered) or whole epochs in turn (unordered), resume, bounds."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from augserve.reorder import Reorderer


def feed(r, keys):
    """Offer each key with itself as the item; return everything released, in order."""
    out = []
    for key in keys:
        out.extend(r.offer(*key, key))
    return out


# --- ordered ---------------------------------------------------------------------------------------------


def test_ordered_releases_in_plan_order():
    r = Reorderer(3, 2, ordered=True)
    assert r.offer(0, 1, "b") == []
    assert r.offer(0, 2, "c") == []
    assert r.held == 2
    assert r.offer(0, 0, "a") == ["a", "b", "c"]
    assert r.held == 0 and r.gate_epoch == 1
    assert r.offer(1, 2, "f") == []
    assert r.offer(1, 0, "d") == ["d"]
    assert not r.done and r.remaining == 2
    assert r.offer(1, 1, "e") == ["e", "f"]
    assert r.done and r.remaining == 0 and r.gate_epoch == 2


def test_ordered_resume_skips_consumed_indices():
    r = Reorderer(4, 3, start_epoch=1, consumed_at_start={0, 2}, ordered=True)
    assert r.remaining == 2 + 4
    assert r.offer(1, 3, "d") == []
    assert r.offer(1, 1, "b") == ["b", "d"]
    assert r.gate_epoch == 2
    assert feed(r, [(2, 3), (2, 2), (2, 1), (2, 0)]) == [(2, 0), (2, 1), (2, 2), (2, 3)]
    assert r.done


# --- unordered -------------------------------------------------------------------------------------------


def test_unordered_releases_on_arrival_and_holds_later_epochs():
    r = Reorderer(3, 3)
    assert r.offer(0, 2, "c") == ["c"]
    assert r.offer(1, 0, "d") == []
    assert r.offer(2, 1, "h") == []
    assert r.offer(1, 2, "f") == []
    assert r.held == 3 and r.gate_epoch == 0
    assert r.offer(0, 0, "a") == ["a"]
    # The last index of epoch 0 opens epoch 1: its held batches follow, in arrival order.
    assert r.offer(0, 1, "b") == ["b", "d", "f"]
    assert r.gate_epoch == 1 and r.held == 1
    assert r.offer(2, 0, "g") == []
    # Completing epoch 1 opens epoch 2, which releases its held batches but is not yet complete.
    assert r.offer(1, 1, "e") == ["e", "h", "g"]
    assert r.gate_epoch == 2 and r.held == 0
    assert r.offer(2, 2, "i") == ["i"]
    assert r.done and r.gate_epoch == 3


def test_unordered_opens_several_complete_epochs_at_once():
    r = Reorderer(2, 3)
    assert feed(r, [(1, 1), (2, 0), (1, 0), (2, 1), (0, 0)]) == [(0, 0)]
    assert r.held == 4
    assert r.offer(0, 1, "x") == ["x", (1, 1), (1, 0), (2, 0), (2, 1)]
    assert r.done


def test_unordered_gate_checks_indices_not_a_count():
    # A count of arrivals in the gate epoch would open it after any two batches; only indices 0 and 1 do.
    r = Reorderer(2, 2, start_epoch=0, consumed_at_start={0})
    assert r.offer(0, 0, "consumed") == []  # consumed before the resume: a duplicate, not progress
    assert r.offer(1, 0, "later") == []
    assert r.offer(0, 0, "again") == []
    assert r.gate_epoch == 0 and r.duplicates == 2 and r.held == 1
    assert r.offer(0, 1, "last") == ["last", "later"]
    assert r.gate_epoch == 1


def test_unordered_resume():
    r = Reorderer(3, 2, start_epoch=1, consumed_at_start={1})
    assert r.remaining == 2
    assert r.missing(1) == [0, 2]
    assert r.offer(1, 2, "c") == ["c"]
    assert r.offer(1, 0, "a") == ["a"]
    assert r.done


@pytest.mark.parametrize("ordered", [False, True])
def test_start_epoch_wholly_consumed_moves_on(ordered):
    r = Reorderer(2, 3, start_epoch=1, consumed_at_start={0, 1}, ordered=ordered)
    assert r.gate_epoch == 2 and r.remaining == 2
    assert r.offer(1, 0, "x") == [] and r.duplicates == 1
    assert r.offer(2, 0, "a") == ["a"]
    assert r.offer(2, 1, "b") == ["b"]
    assert r.done


@pytest.mark.parametrize("ordered", [False, True])
def test_nothing_left_to_do(ordered):
    r = Reorderer(4, 2, start_epoch=2, consumed_at_start={1}, ordered=ordered)
    assert r.done and r.remaining == 0 and r.gate_epoch == 2 and r.held == 0
    with pytest.raises(ValueError, match=r"epoch=2, index=0"):
        r.offer(2, 0, "x")


# --- duplicates and memory -------------------------------------------------------------------------------


@pytest.mark.parametrize("ordered", [False, True])
def test_duplicates_inside_an_epoch_are_dropped(ordered):
    r = Reorderer(3, 1, ordered=ordered)
    assert r.offer(0, 1, "first") == ([] if ordered else ["first"])
    assert r.offer(0, 1, "second") == []
    assert r.duplicates == 1 and r.received == 1
    assert r.held == (1 if ordered else 0)
    out = feed(r, [(0, 0), (0, 2)])
    assert out == ([(0, 0), "first", (0, 2)] if ordered else [(0, 0), (0, 2)])


@pytest.mark.parametrize("ordered", [False, True])
def test_late_duplicates_of_finished_epochs_are_dropped_and_memory_is_pruned(ordered):
    r = Reorderer(3, 4, ordered=ordered)
    feed(r, [(0, i) for i in range(3)] + [(1, i) for i in range(3)] + [(2, 0)])
    # Finished epochs are kept as one integer, not index sets.
    assert set(r._received) == {2} and not r._full
    for key in [(0, 0), (0, 2), (1, 1), (2, 0)]:
        assert r.seen(*key)
        assert r.offer(*key, "late copy") == []
    assert r.duplicates == 4 and r.held == 0
    assert not r.seen(2, 1)
    assert feed(r, [(2, 1), (2, 2)] + [(3, i) for i in range(3)]) == [(2, 1), (2, 2)] + [(3, i) for i in range(3)]
    assert r.done and not r._received and not r._full
    assert r.offer(3, 2, "after the end") == [] and r.duplicates == 5


def test_complete_epoch_ahead_of_the_gate_is_kept_as_a_marker():
    r = Reorderer(2, 3)
    feed(r, [(2, 0), (2, 1)])
    assert r._full == {2} and 2 not in r._received
    assert r.offer(2, 1, "dup") == [] and r.duplicates == 1
    assert r.missing(2) == [] and r.missing(1) == [0, 1]


# --- diagnostics -----------------------------------------------------------------------------------------


def test_missing_names_the_batches_an_epoch_waits_for():
    r = Reorderer(10, 5, start_epoch=3, consumed_at_start={0, 1})
    feed(r, [(3, i) for i in (2, 3, 4, 6, 7, 8)])
    assert r.missing(3) == [5, 9]
    assert r.missing(4) == list(range(10))
    with pytest.raises(ValueError, match="epoch 2 is outside"):
        r.missing(2)
    with pytest.raises(ValueError, match="epoch 5 is outside"):
        r.missing(5)


def test_received_counts_new_keys_only():
    r = Reorderer(3, 2, consumed_at_start={0})
    r.offer(1, 0, "held")
    r.offer(1, 0, "dup")
    r.offer(0, 0, "consumed")
    assert r.received == 1 and r.duplicates == 2 and r.released == 0


# --- refusals --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ordered", [False, True])
@pytest.mark.parametrize("key", [(0, 0), (3, 0), (1, -1), (1, 4), (-1, 0)])
def test_keys_outside_the_plan_are_refused_and_change_nothing(ordered, key):
    r = Reorderer(4, 3, start_epoch=1, ordered=ordered)
    with pytest.raises(ValueError, match=rf"epoch={key[0]}, index={key[1]}\) is outside the plan"):
        r.offer(*key, "x")
    assert r.received == 0 and r.duplicates == 0 and r.remaining == 8 and r.held == 0


@pytest.mark.parametrize("ordered", [False, True])
def test_max_held_is_enforced_without_changing_state(ordered):
    r = Reorderer(3, 3, ordered=ordered, max_held=2)
    ahead = [(1, 0), (1, 1)] if not ordered else [(0, 2), (1, 0)]
    feed(r, ahead)
    assert r.held == 2
    with pytest.raises(ValueError, match=r"max_held=2 \(waiting for epoch 0, batches 0, 1"):
        r.offer(2, 2, "x")
    assert not r.seen(2, 2) and r.held == 2 and r.received == 2
    # A batch released on arrival is never refused, and releasing makes room again.
    assert r.offer(0, 0, "a") == ["a"]
    assert r.offer(0, 1, "b")[0] == "b"
    if not ordered:
        assert r.offer(0, 2, "c") == ["c", (1, 0), (1, 1)]
    assert r.held < 2
    r.offer(2, 2, "x")


def test_max_held_zero_allows_only_in_order_arrivals():
    r = Reorderer(2, 2, ordered=True, max_held=0)
    assert feed(r, [(0, 0), (0, 1), (1, 0)]) == [(0, 0), (0, 1), (1, 0)]
    assert r.offer(0, 0, "late copy") == [] and r.duplicates == 1  # a duplicate is dropped, not refused
    fresh = Reorderer(2, 2, ordered=True, max_held=0)
    with pytest.raises(ValueError, match="max_held=0"):
        fresh.offer(0, 1, "x")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"batches_per_epoch": 0, "epochs": 1}, "batches_per_epoch must be >= 1, got 0"),
        ({"batches_per_epoch": 2, "epochs": 1, "start_epoch": 2}, r"start_epoch must be in \[0, epochs=1\], got 2"),
        ({"batches_per_epoch": 2, "epochs": 1, "start_epoch": -1}, "start_epoch must be in"),
        ({"batches_per_epoch": 2, "epochs": 1, "consumed_at_start": {1, 2, 5}}, r"indices \[2, 5\] outside \[0, 2\)"),
        ({"batches_per_epoch": 2, "epochs": 1, "max_held": -1}, "max_held must be >= 0"),
    ],
)
def test_bad_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Reorderer(**kwargs)


def test_non_integer_keys_are_refused():
    r = Reorderer(2, 1)
    with pytest.raises(TypeError):
        r.offer(0, 1.0, "x")


# --- properties ------------------------------------------------------------------------------------------


@st.composite
def arrivals(draw):
    """A small plan, and every key of it in random order with random duplicates injected after the
    original (and copies of consumed_at_start keys anywhere). Items are (epoch, index, copy number)."""
    bpe = draw(st.integers(1, 5))
    start = draw(st.integers(0, 2))
    epochs = start + draw(st.integers(0, 3))
    consumed = draw(st.frozensets(st.integers(0, bpe - 1))) if epochs > start else frozenset()
    ordered = draw(st.booleans())
    keys = [(e, i) for e in range(start, epochs) for i in range(bpe) if not (e == start and i in consumed)]
    sequence = [(e, i, 0) for e, i in draw(st.permutations(keys))]
    copies = {}
    for _ in range(draw(st.integers(0, 2 * len(keys) + len(consumed)))):
        if keys and draw(st.booleans()):
            e, i = draw(st.sampled_from(keys))
            first = sequence.index((e, i, 0))
            at = draw(st.integers(first + 1, len(sequence)))
        elif consumed:
            e, i = start, draw(st.sampled_from(sorted(consumed)))
            at = draw(st.integers(0, len(sequence)))
        else:
            continue
        copies[(e, i)] = copies.get((e, i), 0) + 1
        sequence.insert(at, (e, i, copies[(e, i)]))
    return bpe, start, epochs, consumed, ordered, keys, sequence


@settings(max_examples=400, deadline=None)
@given(arrivals())
def test_every_key_is_released_exactly_once_in_the_promised_order(case):
    bpe, start, epochs, consumed, ordered, keys, sequence = case
    r = Reorderer(bpe, epochs, start_epoch=start, consumed_at_start=consumed, ordered=ordered)
    total = len(keys)
    received: set = set()  # the model's own record, independent of the Reorderer
    released: list = []
    out_of_gate = 0
    for e, i, copy in sequence:
        is_new = copy == 0
        if ordered:
            next_key = min((k for k in keys if k not in received), default=None)
            releasable = (e, i) == next_key
        else:
            gate = min((k[0] for k in keys if k not in received), default=epochs)
            releasable = e == gate
        out_of_gate += is_new and not releasable
        out = r.offer(e, i, (e, i, copy))
        if is_new:
            received.add((e, i))
            if releasable:
                assert out and out[0] == (e, i, copy)  # released on arrival when it may be
            else:
                assert out == []
        else:
            assert out == []
        released.extend(out)
        assert r.held == len(received) - len(released)
        assert r.held <= out_of_gate
        assert r.remaining == total - len(released)
        assert r.received == len(received)
        # Bounded memory: only epochs not yet wholly received keep an index set.
        assert all(epoch >= r._complete_below and 0 < len(got) < bpe for epoch, got in r._received.items())
    assert r.done and r.remaining == 0 and r.held == 0 and r.gate_epoch == epochs
    assert r.duplicates == sum(copy > 0 for _, _, copy in sequence)
    assert all(copy == 0 for _, _, copy in released)  # the first copy is the one kept
    assert sorted((e, i) for e, i, _ in released) == sorted(keys)  # each exactly once
    if ordered:
        assert [(e, i) for e, i, _ in released] == sorted(keys)
    else:
        released_epochs = [e for e, _, _ in released]
        assert released_epochs == sorted(released_epochs)  # no batch of e+1 before all of e
    assert not r._received and not r._full


@settings(max_examples=200, deadline=None)
@given(arrivals(), st.integers(0, 4))
def test_max_held_refusals_leave_a_consistent_reorderer(case, max_held):
    bpe, start, epochs, consumed, ordered, keys, sequence = case
    r = Reorderer(bpe, epochs, start_epoch=start, consumed_at_start=consumed, ordered=ordered, max_held=max_held)
    released, refused = [], []
    for e, i, copy in sequence:
        try:
            released.extend(r.offer(e, i, (e, i, copy)))
        except ValueError:
            assert r.held == max_held and not r.seen(e, i)
            refused.append((e, i, copy))
        assert r.held <= max_held
    # The refused batches come back (as a re-issue would); the stream still completes exactly once.
    while refused and not r.done:
        retry, refused = refused, []
        for e, i, copy in retry:
            try:
                released.extend(r.offer(e, i, (e, i, copy)))
            except ValueError:
                refused.append((e, i, copy))
        if len(refused) == len(retry):  # everything left is blocked: offer in plan order
            for e, i, copy in sorted(refused):
                released.extend(r.offer(e, i, (e, i, copy)))
            refused = []
    assert r.done
    assert sorted((e, i) for e, i, _ in released) == sorted(keys)
