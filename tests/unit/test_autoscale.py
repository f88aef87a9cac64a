"""The autoscaling policy (pure): exact decisions for given sequences of observation windows."""

from __future__ import annotations

import pytest

from augserve.autoscale import AutoscalePolicy, AutoscaleSettings, Observation, WaitMeter

MS = 1e-3


def stalled(workers: int, wait_ms: float, streams: int = 1) -> Observation:
    return Observation(workers=workers, wait_per_batch=wait_ms * MS, batches=100, full=0.0, active_streams=streams)


def full(workers: int) -> Observation:
    return Observation(workers=workers, wait_per_batch=0.0, batches=50, full=1.0, active_streams=1)


def run(policy: AutoscalePolicy, observations) -> list[tuple[str, int]]:
    return [(d.action, d.target) for d in map(policy.decide, observations)]


def test_adds_while_each_addition_cuts_the_wait_by_more_than_the_threshold_then_holds():
    policy = AutoscalePolicy(AutoscaleSettings(min_workers=1, max_workers=8, threshold=0.03))
    # 100 ms -> 60 (-40 %) -> 40 (-33 %) -> 39 (-2.5 %: the last addition did not help) -> hold there
    decisions = run(policy, [stalled(1, 100), stalled(2, 60), stalled(3, 40), stalled(4, 39), stalled(4, 39.5), stalled(4, 40)])
    assert decisions == [("add", 2), ("add", 3), ("add", 4), ("hold", 4), ("hold", 4), ("hold", 4)]
    assert "2.5%" in policy.history[3].reason and "39.0 ms" in policy.history[3].reason


def test_an_improvement_of_exactly_the_threshold_is_not_enough():
    policy = AutoscalePolicy(AutoscaleSettings(max_workers=8, threshold=0.25))
    waits = [Observation(workers=w, wait_per_batch=s, batches=10, full=0.0, active_streams=1) for w, s in ((1, 1.0), (2, 0.75))]  # exact in binary
    assert run(policy, waits) == [("add", 2), ("hold", 2)]


def test_a_plateau_is_left_when_the_wait_grows_by_more_than_the_threshold():
    policy = AutoscalePolicy(AutoscaleSettings(max_workers=8, threshold=0.03))
    decisions = run(policy, [stalled(1, 100), stalled(2, 99), stalled(2, 101), stalled(2, 110), stalled(3, 50)])
    # 99 is the plateau; 101 is within 3 % of it (hold); 110 is not: the load grew, add again
    assert decisions == [("add", 2), ("hold", 2), ("hold", 2), ("add", 3), ("add", 4)]


def test_never_above_the_maximum_nor_adds_without_a_stall():
    policy = AutoscalePolicy(AutoscaleSettings(min_workers=1, max_workers=2, min_wait_s=0.005))
    decisions = run(policy, [stalled(1, 4.9), stalled(1, 50), stalled(2, 20), stalled(2, 20)])
    assert decisions == [("hold", 1), ("add", 2), ("hold", 2), ("hold", 2)]
    assert "maximum of 2" in policy.history[-1].reason


def test_removes_after_the_queues_stay_full_for_the_set_number_of_windows_down_to_the_minimum():
    policy = AutoscalePolicy(AutoscaleSettings(min_workers=1, max_workers=4, remove_windows=2))
    decisions = run(policy, [full(3), full(3), full(2), full(2), full(1), full(1)])
    assert decisions == [("hold", 3), ("remove", 2), ("hold", 2), ("remove", 1), ("hold", 1), ("hold", 1)]
    assert "minimum of 1" in policy.history[-1].reason


def test_queues_full_only_part_of_the_window_or_a_stalling_trainer_is_no_reason_to_remove():
    policy = AutoscalePolicy(AutoscaleSettings(min_workers=1, max_workers=4, full_fraction=0.9, remove_windows=1))
    half = Observation(workers=3, wait_per_batch=0.0, batches=10, full=0.85, active_streams=1)
    # full, yet one trainer waits (another stream starves): no removal; that stall adds instead
    mixed = Observation(workers=3, wait_per_batch=30 * MS, batches=10, full=1.0, active_streams=2)
    assert run(policy, [half, mixed]) == [("hold", 3), ("add", 4)]


def test_an_addition_that_undoes_a_removal_blocks_removals_for_the_hold_windows():
    policy = AutoscalePolicy(AutoscaleSettings(min_workers=1, max_workers=4, remove_windows=1, flap_hold_windows=3))
    decisions = run(policy, [full(3), stalled(2, 50), full(3), full(3), full(3), full(2)])
    # remove -> the trainer stalls -> add back; removals then wait 3 windows (the add's and two more)
    assert decisions == [("remove", 2), ("add", 3), ("hold", 3), ("hold", 3), ("remove", 2), ("remove", 1)]
    assert "made trainers stall recently" in policy.history[2].reason


def test_no_active_stream_holds_and_bounds_are_restored():
    policy = AutoscalePolicy(AutoscaleSettings(min_workers=2, max_workers=3))
    idle = Observation(workers=2, wait_per_batch=None, batches=0, full=0.0, active_streams=0)
    assert run(policy, [idle, stalled(1, 0), stalled(5, 0)]) == [("hold", 2), ("add", 2), ("remove", 3)]


def test_every_decision_names_its_measurements():
    policy = AutoscalePolicy(AutoscaleSettings(max_workers=4))
    decision = policy.decide(stalled(1, 42.0))
    assert decision.action == "add"
    assert "42.0 ms per batch over 100 batch(es)" in decision.reason and "queues full 0%" in decision.reason and "1 worker(s)" in decision.reason


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(min_workers=3, max_workers=2), "min <= max"),
        (dict(min_workers=0, max_workers=0), "max_workers must be >= 1"),
        (dict(window_s=0), "window_s must be > 0"),
        (dict(threshold=1.5), "threshold must be in [0, 1]"),
    ],
)
def test_bad_settings_name_the_problem(settings, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        AutoscaleSettings(**settings)


def test_the_wait_meter_hands_out_one_window_at_a_time():
    meter = WaitMeter()
    meter.add(3, 0.3)
    meter.add(1, 0.1)
    assert meter.take() == (4, pytest.approx(0.4))
    assert meter.take() == (0, 0.0)
