"""The supervisor: named local processes, restarts with a back-off that is scheduled, never slept."""

import sys
import time

from augserve.supervisor import MAX_BACKOFF_S, Supervisor


def command(code: str):
    """argv of a tiny worker stand-in; ``NAME`` in ``code`` becomes the worker's name."""
    return lambda name: [sys.executable, "-c", code.replace("NAME", name)]


def wait_for_exit(supervisor: Supervisor, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while any(slot.process is not None and slot.process.poll() is None for slot in supervisor.slots):
        assert time.monotonic() < deadline, "the stand-in did not exit"
        time.sleep(0.01)


def test_workers_get_fresh_names_and_a_crash_loop_backs_off_without_blocking():
    supervisor = Supervisor(command("raise SystemExit(3)"), 1)
    supervisor.start()
    names, delays = [], []
    for _ in range(5):
        slot = supervisor.slots[0]
        names.append(slot.name)
        wait_for_exit(supervisor)
        now = slot.started + 0.01  # died young
        started = time.monotonic()
        assert supervisor.poll(now) == [names[-1]]
        assert time.monotonic() - started < 0.5  # scheduled, not slept
        assert slot.process is None
        delays.append(round(slot.restart_at - now, 3))
        assert supervisor.poll(slot.restart_at - 0.001) == [] and slot.process is None  # not due yet
        supervisor.poll(slot.restart_at)  # due: started again
        assert slot.process is not None
    assert delays == [0.25, 0.5, 1.0, 2.0, 4.0]
    assert len(set(names)) == 5 and all(n.startswith("local-0-") for n in names)
    assert supervisor.restarts == 5
    supervisor.stop(timeout=5)


def test_a_worker_that_lived_long_restarts_at_once_and_the_back_off_is_capped():
    supervisor = Supervisor(command("raise SystemExit(0)"), 1)
    supervisor.start()
    slot = supervisor.slots[0]
    slot.quick_deaths = 40
    wait_for_exit(supervisor)
    supervisor.poll(slot.started + 0.01)
    assert slot.restart_at - (slot.started + 0.01) <= MAX_BACKOFF_S
    supervisor.stop()
    slot.process, slot.restart_at = None, None
    supervisor._spawn(slot, 0.0)
    wait_for_exit(supervisor)
    assert supervisor.poll(100.0) and slot.process is not None  # lived 100 s: no wait
    supervisor.stop()


def test_kill_only_touches_our_own_named_workers():
    supervisor = Supervisor(command("import time; time.sleep(30)"), 2)
    supervisor.start()
    try:
        first, second = supervisor.slots
        assert not supervisor.kill("remote-worker") and not supervisor.kill("local-0-000000")
        assert supervisor.kill(first.name)
        first.process.wait(10)
        assert supervisor.poll(time.monotonic()) == [first.name] and second.process.poll() is None
    finally:
        for slot in supervisor.slots:
            if slot.process is not None:
                slot.process.kill()
        supervisor.stop()


def test_the_pool_grows_and_a_retired_worker_is_neither_restarted_nor_counted_as_a_restart():
    supervisor = Supervisor(command("import time; time.sleep(30)"), 1)
    supervisor.start()
    try:
        first = supervisor.names()[0]
        second = supervisor.grow(time.monotonic())
        assert supervisor.names() == [first, second] and supervisor.size == 2 and not supervisor.starting()
        assert supervisor.retire(second) and not supervisor.retire("local-9-nobody")
        assert supervisor.names() == [first] and supervisor.size == 1
        now = time.monotonic()
        supervisor.release(second, now, grace=0.5)
        assert supervisor.poll_exits(now) == []  # still running, within its grace
        assert supervisor.poll_exits(now + 0.6) == [(second, True)]  # overstayed: killed, slot gone
        assert [slot.name for slot in supervisor.slots] == [first] and supervisor.restarts == 0
    finally:
        for slot in supervisor.slots:
            if slot.process is not None:
                slot.process.kill()
        supervisor.stop(timeout=1)


def test_a_retired_worker_that_exits_by_itself_leaves_at_once():
    supervisor = Supervisor(command("raise SystemExit(0)"), 2)
    supervisor.start()
    victim = supervisor.names()[1]
    supervisor.retire(victim)
    wait_for_exit(supervisor)
    gone = supervisor.poll_exits(time.monotonic())
    assert (victim, True) in gone and len(supervisor.slots) == 1 and supervisor.restarts == 1  # the other one restarted
    supervisor.stop(timeout=1)
