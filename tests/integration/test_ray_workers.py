"""Workers as Ray actors, on a simulated cluster (``ray.cluster_utils.Cluster``) on this machine.

One cluster for the module: a head node without CPUs (so no actor lands there) and three one-CPU
nodes, each a raylet of its own. Each test starts a real ``augserve serve --ray ADDRESS`` whose actors
join it over TCP with the worker keys it passed them through Ray, and a real client. A worker's node
is found by its process's parent, the raylet that started it. Ray's start-up is slow on two cores: the
cluster costs ~15 s once, each daemon ~10 s until its actors have joined.
"""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading

import pytest

try:  # tests/integration is a package in some checkouts and a plain folder in others
    from .conftest import GEOMETRIC, as_record, freeze_a_busy_worker, ids_per_epoch, open_stream, subprocess_env, wait_until
    from .test_service_autoscale import Watcher, assert_exactly_once, consume
except ImportError:
    from conftest import GEOMETRIC, as_record, freeze_a_busy_worker, ids_per_epoch, open_stream, subprocess_env, wait_until
    from test_service_autoscale import Watcher, assert_exactly_once, consume

ray_cluster_utils = pytest.importorskip("ray.cluster_utils", reason="Ray is not installed (pip install 'augserve[ray]')")

READY_S = 120.0  # actors start on raylets that compete for two cores


@pytest.fixture(scope="module")
def cluster():
    cluster = ray_cluster_utils.Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        for _ in range(3):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        cluster.shutdown()


def raylets(cluster) -> dict[int, object]:
    """raylet pid -> node, for the nodes with CPUs."""
    return {node.all_processes["raylet"][0].process.pid: node for node in cluster.worker_nodes}


def node_of(cluster, pid: int):
    with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
        parent = int(handle.read().rsplit(")", 1)[1].split()[1])
    return raylets(cluster).get(parent)


def serve_on_ray(start_daemon, cluster, tmp_path, *flags: str, workers: str = "2", expect: int = 2, extra: str = ""):
    config = tmp_path / "daemon.yaml"
    config.write_text("ray: {num_cpus: 1, max_restarts: 1}\n" + extra)
    daemon = start_daemon("--config", str(config), "--ray", cluster.address, "--workers", workers, *flags, workers=None, wait=False)
    daemon.wait_ready(expect, timeout=READY_S)
    return daemon


@pytest.mark.slow
def test_an_epoch_across_actors_on_several_nodes_arrives_exactly_once(start_daemon, cluster, tmp_path):
    private_dirs = os.path.join(tempfile.gettempdir(), "augserve-keys-*")
    before = set(glob.glob(private_dirs))
    daemon = serve_on_ray(start_daemon, cluster, tmp_path)
    # The actors keep their keys in memory: no directory with a worker's secret key outlives their start
    # (one killed with its node could not remove it).
    assert set(glob.glob(private_dirs)) <= before
    workers = daemon.status()["workers"]
    assert all(w["worker"].startswith("ray-") for w in workers)
    nodes = {id(node_of(cluster, w["pid"])) for w in workers}
    assert len(nodes) == 2 and id(None) not in nodes, "the two actors should be spread over two nodes"
    n = 600
    stream = open_stream(daemon.address, pipeline=GEOMETRIC, batch_size=16, dataset_options={"size": 64, "n": n}, epochs=1, prefetch=6, seed=1)
    received = consume(stream)
    assert_exactly_once(received, stream, n, 1)
    assert all(w["batches"] > 0 for w in daemon.status()["workers"]), "both actors should have made batches"
    log = daemon.log()
    assert "2 Ray actor albumentations worker(s)" in log and "CurveZMQ" in log


@pytest.mark.slow
def test_a_node_removed_mid_epoch_loses_and_duplicates_nothing(start_daemon, cluster, tmp_path):
    daemon = serve_on_ray(start_daemon, cluster, tmp_path)
    n = 800
    stream = open_stream(daemon.address, pipeline=GEOMETRIC, batch_size=16, dataset_options={"size": 128, "n": n}, epochs=1, prefetch=8, seed=2)
    records, errors = [], []

    def take():
        try:
            records.extend(as_record(batch) for batch in stream)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    consumer = threading.Thread(target=take, daemon=True)
    consumer.start()
    try:
        wait_until(lambda: len(records) >= 5, timeout=60, interval=0.05, what="five batches")
        victim, held = freeze_a_busy_worker(daemon)
        removed = node_of(cluster, victim["pid"])
        assert removed is not None
        cluster.remove_node(removed)
        try:
            os.kill(victim["pid"], signal.SIGKILL)  # what the node's end means for its processes
        except ProcessLookupError:
            pass
        consumer.join(timeout=120)
        assert not consumer.is_alive() and not errors, errors or "the stream did not finish"
        keys = [(r["epoch"], r["index"]) for r in records]
        assert len(keys) == len(set(keys)) == stream.batches_per_epoch
        assert sorted(ids_per_epoch(records)[0]) == list(range(n))
        log = daemon.log()
        assert f"worker {victim['worker']} gone" in log and "worker actor " + victim["worker"] + " ended" in log, log[-3000:]
        status = daemon.status()
        assert status["reissued_tasks"] >= held and status["worker_restarts"] >= 1
        wait_until(lambda: len(daemon.status()["workers"]) == 2, timeout=READY_S, what="the replacement actor")
        assert all(node_of(cluster, w["pid"]) not in (None, removed) for w in daemon.status()["workers"])
    finally:
        cluster.add_node(num_cpus=1)  # the next test finds three nodes again
        cluster.wait_for_nodes()


@pytest.mark.slow
def test_autoscaling_adds_actors_while_a_stream_stalls(start_daemon, cluster, tmp_path):
    daemon = serve_on_ray(start_daemon, cluster, tmp_path, workers="auto:1:3", expect=1, extra="autoscale: {window_s: 1.0}\n")
    n, epochs = 1200, 2
    stream = open_stream(daemon.address, pipeline=GEOMETRIC, batch_size=32, dataset_options={"size": 128, "n": n}, epochs=epochs, prefetch=8, seed=3)
    watcher = Watcher(daemon)
    watcher.start()
    received = consume(stream)
    counts = watcher.stop()
    assert_exactly_once(received, stream, n, epochs)
    log = daemon.log()
    assert 2 <= max(counts) <= 3, f"worker counts {counts}:\n{log[-3000:]}"
    add = next(line for line in log.splitlines() if "autoscale: add a worker (1 -> 2, ray-" in line)
    assert "trainers stall" in add


def test_asking_for_ray_without_ray_installed_is_one_line():
    """In an interpreter where ``import ray`` fails as for a package that is not installed."""
    finder = textwrap.dedent(
        """
        import sys
        class Absent:
            def find_spec(self, name, path=None, target=None):
                if name == "ray" or name.startswith("ray."):
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        sys.meta_path.insert(0, Absent())
        from augserve.cli import main
        sys.exit(main(["serve", "--ray", "--workers", "1", "--bind", "tcp://127.0.0.1:*"]))
        """
    )
    result = subprocess.run([sys.executable, "-c", finder], env=subprocess_env(), capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["augserve: error: --ray needs Ray, which is not installed here: pip install 'augserve[ray]'"]


def test_an_unreachable_ray_cluster_is_one_line():
    env = subprocess_env(RAY_ADDRESS="")
    result = subprocess.run(
        [sys.executable, "-m", "augserve", "serve", "--ray", "127.0.0.1:9", "--workers", "1", "--bind", "tcp://127.0.0.1:*"],
        env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("augserve: error: cannot reach the Ray cluster at '127.0.0.1:9'"), result.stderr[-3000:]

