"""``augserve bench control-plane``'s table where the daemon's CPU time over a short run reads zero."""

from augserve.bench.control_plane import format_table


def test_a_daemon_cpu_time_that_reads_zero_is_shown_as_a_dash():
    """/proc counts CPU time in 10 ms ticks: in a short run the daemon's can read 0, so tasks per daemon
    CPU-second has no value — in a row and in the median — and the table says so instead of failing."""
    cpu = {"daemon": 0.0, "daemon_loop": 0.0, "workers": 12.0, "trainers": 30.0, "others": 1.0}
    row = {"client": "fake", "workers": 2, "streams": 1, "tasks_per_s": 950.0, "cpu_pct": cpu, "tasks_per_daemon_cpu_s": None,
           "bound_by": "trainers", "exactly_once": True, "acked": 20, "tasks": 20, "duplicates": 0}  # fmt: skip
    conditions = {"cores": 2, "cpu": "AMD EPYC", "load_average": None, "python": "3.11.7", "pyzmq": "27.3.0", "libzmq": "4.3.5", "curve": "libsodium"}
    result = {"batch_size": 1, "prefetch": 4, "capacity": 2, "rows": [row], "conditions": conditions,
              "min_tasks_per_s": 950.0, "max_tasks_per_s": 950.0, "median_tasks_per_daemon_cpu_s": None}  # fmt: skip
    lines = format_table(result).splitlines()
    assert "| fake | 2 | 1 | 950 | 0 | 0 | 12 | 30 | 1 | – | trainers | yes |" in lines
    assert "tasks/s: 950 to 950; median tasks per daemon CPU-second –" in lines
