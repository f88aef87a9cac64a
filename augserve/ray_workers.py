"""Workers as Ray actors: ``augserve serve --ray [ADDRESS]`` (``pip install 'augserve[ray]'``).

:class:`RayPool` is the daemon's worker pool when its config has a ``ray`` section; it offers the same
methods as the :class:`~augserve.supervisor.Supervisor` (start, poll, grow, retire, kill, stop), so
the daemon and the autoscaler treat both alike. Each worker is one actor — ``num_cpus`` / ``num_gpus``
each, spread over the cluster's nodes (Ray's ``SPREAD`` strategy) — whose one long call runs an
ordinary augserve worker (:func:`~augserve.worker.run_worker`) that joins the daemon over TCP like
``augserve worker --connect``. A worker on the daemon's host still hands batches to trainers there
through shared memory (the worker decides that for itself, per task).

**Keys through Ray.** The daemon gives each actor its worker key bundle (the text of
``augserve keys export --role worker``: the daemon's public key and the worker key pair) as an argument;
the actor imports it into a private temporary directory on its node, runs the worker with it, and
removes the directory when the worker ends. Whoever may submit work to the Ray cluster may read that
argument, so the cluster is inside the trust boundary of the daemon's worker key.

**Restarts.** Each run of a worker has a fresh name (``ray-<place>-<random>``; a name is never reused,
so a dead connection cannot shadow a new one). When a run ends without being asked to (its process or
node died, or it was killed as hung), the pool starts a new run, after the same back-off as local
workers: on the same actor while Ray has restarted it (``max_restarts`` per actor), else on a new
actor that Ray places on a live node.
"""

from __future__ import annotations

import logging
import shutil
import socket
import tempfile
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable

from .supervisor import MAX_BACKOFF_S, QUICK_DEATH_S, ResizablePool

log = logging.getLogger("augserve.ray")

INSTALL_HINT = "--ray needs Ray, which is not installed here: pip install 'augserve[ray]'"


def require_ray():
    """The ``ray`` module, or ValueError with the one line that says how to install it."""
    try:
        import ray
    except ImportError:
        raise ValueError(INSTALL_HINT) from None
    return ray


def reachable_address(address: str) -> str:
    """The daemon's bound address as actors on other nodes reach it: a wildcard host becomes this host's
    IP address (the one Ray uses, when Ray is up). Loopback stays loopback: right for a cluster on this
    host (and a warning in the log otherwise); ``ray.connect`` in the config overrides all this."""
    for wildcard in ("tcp://0.0.0.0:", "tcp://*:", "tcp://[::]:"):
        if address.startswith(wildcard):
            return f"tcp://{_host_ip()}:{address[len(wildcard):]}"
    return address


def _host_ip() -> str:
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except ImportError:
        pass
    return socket.gethostbyname(socket.gethostname())


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Refuse a ``HOST:PORT`` cluster address nothing answers on, at once: Ray itself retries for minutes."""
    if address in ("auto", "local") or "://" in address:
        return  # Ray finds "auto" itself (and says so quickly when there is none); ray:// is a client address
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"bad Ray address {address!r}: expected auto, local, HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise ValueError(f"cannot reach the Ray cluster at {address!r}: {exc.strerror or exc}") from None


@dataclass(frozen=True)
class ActorOptions:
    """What every worker actor is given (pickled by Ray): where the daemon is, how to run, and its keys
    (``bundle``: the worker key bundle text; ``None`` for a daemon without keys)."""

    connect: str
    backend: str
    device: str
    threads: int
    capacity: int
    heartbeat_interval: float
    heartbeat_liveness: int
    shm_reserve_mb: int
    log_level: str
    bundle: str | None

    @classmethod
    def for_daemon(cls, config, address: str, keyring) -> ActorOptions:
        ray = config.ray
        device = config.device
        if device.startswith("cuda") and ray.num_gpus > 0:
            device = "cuda:0"  # Ray makes the actor's own GPU(s) the only visible one(s)
        if address.startswith("ipc://"):
            raise ValueError("--ray workers join over TCP: bind the daemon to tcp://HOST:PORT, not an ipc:// address")
        return cls(
            connect=address, backend=config.backend, device=device, threads=config.threads_per_worker, capacity=config.tasks_per_worker,
            heartbeat_interval=config.heartbeat_interval, heartbeat_liveness=config.heartbeat_liveness, shm_reserve_mb=config.shm_reserve_mb,
            log_level=config.log_level, bundle=keyring.export_bundle("worker") if keyring is not None else None,
        )  # fmt: skip


class WorkerActor:
    """The body of one worker actor (made a Ray actor class by :class:`RayPool`)."""

    def run(self, name: str, options: ActorOptions) -> int:
        """Run one augserve worker called ``name`` until the daemon says stop. Returns its exit status."""
        logging.basicConfig(level=options.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
        from .security import Keyring
        from .worker import WorkerOptions, run_worker

        keyring = None
        if options.bundle is not None:
            # The bundle's keys go through a private directory (the keyring's one reader and format) and are
            # kept in memory: the directory, with the worker's secret key, is gone before the worker starts,
            # so an actor killed with its node leaves no secret behind.
            keys_dir = tempfile.mkdtemp(prefix="augserve-keys-")  # mode 0700: private to this user
            try:
                Keyring.import_bundle(options.bundle, keys_dir)
                keyring = Keyring.load(keys_dir, create=False)
            finally:
                shutil.rmtree(keys_dir, ignore_errors=True)
        worker = WorkerOptions(
            connect=options.connect, backend=options.backend, device=options.device, threads=options.threads,
            heartbeat_interval=options.heartbeat_interval, heartbeat_liveness=options.heartbeat_liveness, capacity=options.capacity,
            name=name, keyring=keyring, insecure=options.bundle is None, shm_reserve_mb=options.shm_reserve_mb,
        )  # fmt: skip
        return run_worker(worker)

    def node(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()


@dataclass
class _Place:
    """One worker place: its actor, the current run (``None`` while waiting to restart) and its name."""

    index: int
    name: str = ""
    actor: Any = None
    run: Any = None  # ObjectRef of WorkerActor.run
    started: float = 0.0
    runs_on_actor: int = 0  # runs started on this actor (the first, then one per Ray restart)
    quick_deaths: int = 0
    restart_at: float | None = None
    retiring: bool = False
    kill_at: float | None = None


class RayPool(ResizablePool):
    """``RayPool(config, options)``: ``config.workers`` actors on the Ray cluster of ``config.ray``;
    ``options()`` gives the :class:`ActorOptions` (called at :meth:`start`, once the daemon is bound)."""

    def __init__(self, config, options: Callable[[], ActorOptions]) -> None:
        self.config = config
        self.settings = config.ray
        self._options_factory = options
        self._options: ActorOptions | None = None
        self._actor_class = None
        self._owns_ray = False
        self.slots: list[_Place] = []
        self._next_index = 0
        self.restarts = 0

    # --- lifecycle -------------------------------------------------------------------------------------

    def start(self) -> None:
        ray = require_ray()
        address = self.settings.address
        if not ray.is_initialized():
            _check_reachable(address)
            try:
                if address == "local":
                    ray.init(namespace="augserve", include_dashboard=False, configure_logging=False)
                else:
                    ray.init(address=address, namespace="augserve", configure_logging=False)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise ValueError(f"cannot reach the Ray cluster at {address!r}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
            self._owns_ray = True
        self._options = self._options_factory()
        if self._options.connect.startswith("tcp://127.") and len(ray.nodes()) > 1:
            log.warning("actors will connect to %s, a loopback address: only those on this host can; bind the daemon to a reachable address or set ray.connect", self._options.connect)
        self._actor_class = ray.remote(WorkerActor)
        now = time.monotonic()
        for _ in range(self.config.workers):
            self.grow(now)
        log.info("Ray cluster at %s: %d node(s) alive; %d worker actor(s) of %g CPU / %g GPU each", address, sum(1 for n in ray.nodes() if n.get("Alive")),
                 self.config.workers, self.settings.num_cpus, self.settings.num_gpus)  # fmt: skip

    def stop(self, timeout: float = 5.0) -> None:
        """Wait up to ``timeout`` s for runs told to stop, then kill every actor; leave Ray if we joined it."""
        ray = require_ray()
        runs = [p.run for p in self.slots if p.run is not None]
        if runs:
            ray.wait(runs, num_returns=len(runs), timeout=timeout)
        for place in self.slots:
            if place.actor is not None:
                ray.kill(place.actor, no_restart=True)
            place.actor = place.run = None
        self.slots = []
        if self._owns_ray:
            ray.shutdown()
            self._owns_ray = False

    # --- growing and shrinking (ResizablePool) --------------------------------------------------------

    def _new_slot(self, index: int) -> _Place:
        return _Place(index)

    def _running(self, place: _Place) -> bool:
        return place.run is not None

    def kill(self, name: str) -> bool:
        """Kill a hung worker's actor (Ray may restart it; the pool starts a new run either way)."""
        for place in self.slots:
            if place.name == name and place.actor is not None:
                require_ray().kill(place.actor, no_restart=False)
                return True
        return False

    # --- watching --------------------------------------------------------------------------------------

    def poll(self, now: float) -> list[str]:
        return [name for name, _retired in self.poll_exits(now)]

    def poll_exits(self, now: float) -> list[tuple[str, bool]]:
        """Runs that ended (their names; retired ones with True), and the restarts that are due."""
        ray = require_ray()
        runs = [p.run for p in self.slots if p.run is not None]
        ended = set(ray.wait(runs, num_returns=len(runs), timeout=0)[0]) if runs else set()
        gone: list[tuple[str, bool]] = []
        for place in list(self.slots):
            if place.retiring and place.run is not None and place.run not in ended and place.kill_at is not None and now >= place.kill_at:
                log.warning("retired worker %s overstayed its stop; killing its actor", place.name)
                ray.kill(place.actor, no_restart=True)
                place.kill_at = None  # its run ends at a later poll
            if place.run is not None and place.run in ended:
                outcome = _outcome(ray, place.run)
                place.run = None
                if place.retiring:
                    log.info("worker actor %s retired (%s)", place.name, outcome)
                    ray.kill(place.actor, no_restart=True)
                    self.slots.remove(place)
                    gone.append((place.name, True))
                    continue
                gone.append((place.name, False))
                place.quick_deaths = place.quick_deaths + 1 if now - place.started < QUICK_DEATH_S else 0
                delay = 0.0 if place.quick_deaths == 0 else min(MAX_BACKOFF_S, 0.25 * 2 ** (place.quick_deaths - 1))
                log.warning("worker actor %s ended (%s); restarting in %.2f s", place.name, outcome, delay)
                place.restart_at = now + delay
                self.restarts += 1
            elif place.retiring and place.run is None:
                self.slots.remove(place)
                gone.append((place.name, True))
                continue
            if place.run is None and place.restart_at is not None and now >= place.restart_at:
                self._spawn(place, now)
        return gone

    def _spawn(self, place: _Place, now: float) -> None:
        """Start a run on the place's actor while Ray may still have restarted it, else on a new actor."""
        restarts = self.settings.max_restarts
        if place.actor is not None and (restarts < 0 or place.runs_on_actor <= restarts):
            pass  # the same actor: Ray restarts it (up to max_restarts) and queues the call until then
        else:
            if place.actor is not None:
                require_ray().kill(place.actor, no_restart=True)
            place.actor = self._actor_class.options(
                num_cpus=self.settings.num_cpus, num_gpus=self.settings.num_gpus, max_restarts=restarts, max_task_retries=0, scheduling_strategy="SPREAD"
            ).remote()  # fmt: skip
            place.runs_on_actor = 0
        place.name = f"ray-{place.index}-{uuid.uuid4().hex[:6]}"
        place.run = place.actor.run.remote(place.name, self._options)
        place.runs_on_actor += 1
        place.started, place.restart_at = now, None


def _outcome(ray, run) -> str:
    try:
        return f"exit status {ray.get(run, timeout=0)}"
    except Exception as exc:  # the actor or its node died: Ray says how, on its first line
        return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:200]}"
