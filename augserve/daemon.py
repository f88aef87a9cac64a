"""The daemon: one ROUTER socket for trainers and workers, an event loop, local worker processes.

Control plane only — batches travel from workers straight to trainers. The daemon validates attach
requests, cuts epochs into tasks, hands tasks to the least-loaded worker in round-robin order over the
streams that have credits (so streams share workers fairly), tracks every task until its trainer
acknowledges it, and re-issues the tasks of a worker that died. Nothing a peer sends can crash it: a
bad message gets an ``error`` reply naming the problem, and the loop goes on.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field

import zmq
from pydantic import ValidationError

from . import protocol as P
from .config import BUILTIN_DATASETS, DaemonConfig, check_address
from .epochs import EpochPlan
from .metrics import DaemonMetrics, NullMetrics
from .streams import AttachRequest, RateMeter, StageTimes, Stream

log = logging.getLogger("augserve.daemon")


@dataclass
class WorkerState:
    """A connected worker as the daemon sees it."""

    identity: bytes
    pid: int
    host: str
    backend: str
    device: str
    capacity: int
    last_heard: float
    tasks: dict[str, tuple[str, int, int]] = field(default_factory=dict)  # task id -> (stream, epoch, index)
    done: int = 0
    samples: int = 0
    rate: RateMeter = field(default_factory=RateMeter)
    times: StageTimes = field(default_factory=StageTimes)

    @property
    def free(self) -> int:
        return self.capacity - len(self.tasks)


@dataclass
class LocalWorker:
    """A worker process this daemon started (and restarts when it dies)."""

    slot: int
    process: subprocess.Popen
    started: float
    restarts: int = 0


class Daemon:
    """``Daemon(config).serve()`` runs until :meth:`stop` (or SIGINT/SIGTERM via :meth:`install_signal_handlers`)."""

    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.context = zmq.Context()
        self.socket: zmq.Socket | None = None
        self.address = config.bind
        self.workers: dict[bytes, WorkerState] = {}
        self.local: dict[int, LocalWorker] = {}
        self.streams: dict[str, Stream] = {}
        self.sources: dict[tuple, object] = {}
        self.worker_restarts = 0
        self.skipped_corrupt = 0
        self.metrics = DaemonMetrics() if config.metrics_port is not None else NullMetrics()
        self.metrics_port: int | None = None
        self._stopping = False
        self._rotation = 0
        self._started = time.monotonic()

    # --- lifecycle -------------------------------------------------------------------------------------

    def start(self) -> str:
        """Bind the control socket and start the local workers. Returns the bound address."""
        self.socket = self.context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.ROUTER_MANDATORY, 1)  # sending to a vanished peer raises instead of vanishing
        self.socket.setsockopt(zmq.RCVHWM, 100_000)
        # Control messages are small: a peer announcing a huge frame is cut off by libzmq before it is buffered.
        self.socket.setsockopt(zmq.MAXMSGSIZE, P.MAX_HEADER_BYTES + 4096)
        try:
            self.socket.bind(self.config.bind)
        except zmq.ZMQError as exc:
            self.socket.close(linger=0)
            raise ValueError(f"cannot bind {self.config.bind}: {exc.strerror}") from None
        self.address = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        if self.config.metrics_port is not None:
            try:
                self.metrics_port = self.metrics.start_http(self.config.metrics_port)
            except ValueError:
                self.socket.close(linger=0)
                self.socket = None
                raise
            log.info("Prometheus metrics on http://127.0.0.1:%d/metrics", self.metrics_port)
        for slot in range(self.config.workers):
            self._spawn(slot)
        log.info("augserve daemon on %s with %d %s worker(s) on %s", self.address, self.config.workers, self.config.backend, self.config.device)
        return self.address

    @property
    def worker_address(self) -> str:
        """Where local workers connect: the bound address, with a wildcard host made concrete."""
        address = self.address
        for wildcard in ("tcp://0.0.0.0:", "tcp://*:"):
            if address.startswith(wildcard):
                return "tcp://127.0.0.1:" + address[len(wildcard) :]
        return address

    def stop(self) -> None:
        self._stopping = True

    def install_signal_handlers(self) -> None:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: self.stop())

    def serve(self) -> None:
        if self.socket is None:
            self.start()
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        interval = self.config.heartbeat_interval
        next_housekeeping = time.monotonic()
        try:
            while not self._stopping:
                events = dict(poller.poll(timeout=int(min(interval, 0.2) * 1000)))
                if self.socket in events:
                    # Drain everything that is waiting, then schedule once.
                    for _ in range(10_000):
                        try:
                            frames = self.socket.recv_multipart(flags=zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self._dispatch(frames)
                now = time.monotonic()
                if now >= next_housekeeping:
                    self._housekeeping(now)
                    next_housekeeping = now + interval / 2
                self._schedule()
        finally:
            self.close()

    def close(self) -> None:
        """Stop workers, close the socket, release everything. Safe to call twice."""
        self.metrics.stop()
        if self.socket is None:
            return
        for stream in list(self.streams.values()):  # trainers learn at once instead of after batch_timeout
            self._send(stream.client, "stream_error", {"stream": stream.id, "message": "the daemon is shutting down", "kind": "shutdown"})
        for identity in list(self.workers):
            self._send(identity, "stop", {})
        deadline = time.monotonic() + 5.0
        for worker in self.local.values():
            try:
                worker.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                worker.process.kill()
                worker.process.wait()
        self.local.clear()
        self.socket.close(linger=0)
        self.socket = None
        self.context.term()
        if self.address.startswith("ipc://"):
            try:
                os.unlink(self.address[len("ipc://") :])
            except OSError:
                pass
        log.info("augserve daemon stopped")

    # --- local workers ---------------------------------------------------------------------------------

    def _spawn(self, slot: int, restarts: int = 0) -> None:
        command = [
            sys.executable, "-m", "augserve", "--log-level", self.config.log_level, "worker",
            "--connect", self.worker_address,
            "--backend", self.config.backend,
            "--device", self.config.device,
            "--threads", str(self.config.threads_per_worker),
            "--capacity", str(self.config.tasks_per_worker),
            "--heartbeat-interval", str(self.config.heartbeat_interval),
            "--heartbeat-liveness", str(self.config.heartbeat_liveness),
            "--local",
            "--name", f"local-{slot}-{uuid.uuid4().hex[:6]}",
        ]  # fmt: skip
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, start_new_session=False)
        self.local[slot] = LocalWorker(slot, process, time.monotonic(), restarts)

    def _check_local_workers(self, now: float) -> None:
        for slot, worker in list(self.local.items()):
            code = worker.process.poll()
            if code is None:
                continue
            log.warning("local worker %d (pid %d) exited with %s; restarting", slot, worker.process.pid, code)
            for identity, state in list(self.workers.items()):
                if state.pid == worker.process.pid:
                    self._forget_worker(identity, "exited")
            self.worker_restarts += 1
            self.metrics.worker_restarted()
            # Back off a crash loop: a worker that died within a second waits a little before coming back.
            if now - worker.started < 1.0:
                time.sleep(min(2.0, 0.1 * (worker.restarts + 1)))
            self._spawn(slot, worker.restarts + 1)

    def _forget_worker(self, identity: bytes, reason: str) -> None:
        state = self.workers.pop(identity, None)
        if state is None:
            return
        self.metrics.worker_left(identity.decode(errors="replace"))
        requeued = sum(stream.requeue_worker(identity) for stream in self.streams.values())
        log.info("worker %s gone (%s); %d task(s) re-queued", identity.decode(errors="replace"), reason, requeued)

    # --- the loop's pieces -----------------------------------------------------------------------------

    def _housekeeping(self, now: float) -> None:
        self._check_local_workers(now)
        liveness = self.config.heartbeat_interval * self.config.heartbeat_liveness
        for identity, state in list(self.workers.items()):
            if now - state.last_heard > liveness:
                self._forget_worker(identity, f"silent for {now - state.last_heard:.1f} s")
                for worker in self.local.values():
                    if worker.process.pid == state.pid and worker.process.poll() is None:
                        worker.process.kill()  # hung: the restart happens at the next check
            else:
                self._send(identity, "ping", {})
        for stream in list(self.streams.values()):
            if now - stream.last_heard > liveness * 2:
                log.warning("stream %s: trainer silent for %.1f s; dropping it", stream.id, now - stream.last_heard)
                self._end_stream(stream)
        self.metrics.update_from_status(self.status)

    def _schedule(self) -> None:
        """Hand out tasks: streams in round-robin order, each task to the least-loaded worker."""
        if not self.workers or not self.streams:
            return
        now = time.monotonic()
        while True:
            streams = [s for s in self.streams.values() if s.has_work()]
            if not streams:
                return
            progress = False
            self._rotation = (self._rotation + 1) % len(streams)
            for stream in streams[self._rotation :] + streams[: self._rotation]:
                worker = max(self.workers.values(), key=lambda w: w.free)
                if worker.free <= 0:
                    return
                task = stream.next_task(now)
                if task is None:
                    continue
                epoch, index, ids, task_id, version = task
                fields = {
                    "task": task_id,
                    "stream": stream.id,
                    "epoch": epoch,
                    "index": index,
                    "ids": ids,
                    "seed": stream.request.seed,
                    "dataset": stream.dataset,
                    "pipeline": {"stream": stream.id, "version": version, "spec": stream.versions[version]},
                    "data": stream.request.data,
                    "on_error": stream.request.on_error,
                }
                if self._send(worker.identity, "task", fields):
                    worker.tasks[task_id] = (stream.id, epoch, index)
                    stream.assign((epoch, index), worker.identity)
                    progress = True
                else:
                    stream.reissue.appendleft((epoch, index))
                    self._forget_worker(worker.identity, "unreachable")
                    if not self.workers:
                        return
            if not progress:
                return

    def _send(self, identity: bytes, message_type: str, fields: dict) -> bool:
        try:
            self.socket.send_multipart([identity, *P.encode(message_type, fields)], flags=zmq.NOBLOCK)
            return True
        except zmq.ZMQError as exc:  # EHOSTUNREACH (peer gone) or a full queue
            log.debug("could not send %s to %r: %s", message_type, identity, exc)
            return False

    def _dispatch(self, frames) -> None:
        identity = frames[0].bytes
        try:
            message = P.decode(frames[1:])
        except P.ProtocolError as exc:
            log.info("refused a message from %r: %s", identity[:16], exc)
            self._send(identity, "error", {"message": str(exc), "code": "protocol"})
            return
        try:
            if message.type in P.WORKER_TO_DAEMON:
                self._on_worker(identity, message)
            elif message.type in P.CLIENT_TO_DAEMON:
                self._on_client(identity, message)
            else:
                raise P.ProtocolError(f"unexpected message type {message.type!r} for a daemon")
        except (P.ProtocolError, ValueError, TypeError, KeyError) as exc:
            log.info("bad %s message from %r: %s", message.type, identity[:16], exc)
            self._send(identity, "error", {"message": f"bad {message.type} message: {exc}", "code": "bad_request"})

    # --- workers ---------------------------------------------------------------------------------------

    def _on_worker(self, identity: bytes, message: P.Message) -> None:
        now = time.monotonic()
        state = self.workers.get(identity)
        if message.type in ("ready", "heartbeat"):
            if state is None:
                capacity = int(message.get("capacity", 1))
                if not 1 <= capacity <= 64:
                    raise ValueError(f"worker capacity must be in [1, 64], got {capacity}")
                state = WorkerState(identity, int(message.get("pid", 0)), str(message.get("host", "?")), str(message.get("backend", "?")), str(message.get("device", "?")), capacity, now)
                self.workers[identity] = state
                log.info("worker %s joined (pid %d on %s, %s/%s)", identity.decode(errors="replace"), state.pid, state.host, state.backend, state.device)
            state.last_heard = now
            return
        if message.type == "bye":
            self._forget_worker(identity, "left")
            return
        if state is None:
            return  # a stray report from a worker we already wrote off: its tasks were re-issued
        state.last_heard = now
        (task_id,) = message.require("task")
        where = state.tasks.pop(task_id, None)
        stream = self.streams.get(where[0]) if where else None
        if message.type == "done":
            samples = int(message.get("samples", 0))
            state.done += 1
            state.samples += samples
            state.rate.add(samples, now)
            state.times.add(message.get("times", {}))
            skipped = int(message.get("skipped", 0))
            self.skipped_corrupt += skipped
            self.metrics.batch_done(stream.id if stream is not None else None, identity.decode(errors="replace"), samples, skipped, message.get("times", {}))
            if stream is not None:
                stream.times.add(message.get("times", {}))
                stream.skipped_corrupt += skipped
        elif message.type == "failed" and stream is not None:
            text = str(message.get("message", "worker failed"))
            log.warning("stream %s: %s", stream.id, text)
            self._send(stream.client, "stream_error", {"stream": stream.id, "message": text, "kind": message.get("kind", "error")})
            self._end_stream(stream)

    # --- trainers --------------------------------------------------------------------------------------

    def _on_client(self, identity: bytes, message: P.Message) -> None:
        if message.type == "status":
            self._send(identity, "status_reply", {"status": self.status()})
            return
        if message.type == "attach":
            self._attach(identity, message)
            return
        (stream_id,) = message.require("stream")
        stream = self.streams.get(stream_id)
        if message.type == "update" and stream is not None:
            self._update(identity, stream, message)  # also from outside the trainer: `augserve tune set`
            return
        if stream is None or stream.client != identity:
            self._send(identity, "error", {"message": f"unknown stream {stream_id!r} (the daemon may have restarted)", "code": "unknown_stream"})
            return
        stream.last_heard = time.monotonic()
        if message.type == "credit":
            for entry in message.get("acks", []):
                epoch, index, samples = (list(entry) + [0])[:3]
                stream.ack(epoch, index, int(samples))
            if stream.finished() and message.get("final"):
                self._end_stream(stream)
        elif message.type == "detach":
            self._end_stream(stream)

    def _update(self, identity: bytes, stream: Stream, message: P.Message) -> None:
        """Live re-tuning: validate the new spec (or changes to the current one) and apply it from the
        next batch not yet issued. The trainer is told, whoever asked."""
        import pipelines
        from pipelines.changes import apply_changes

        current = pipelines.PipelineSpec.model_validate(stream.spec)
        try:
            if message.get("spec") is not None:
                spec = _spec_from_request(message.get("spec"))
            else:
                changes = message.get("changes")
                if not isinstance(changes, dict) or not changes:
                    raise ValueError("an update needs 'spec' or a non-empty 'changes' mapping")
                spec = apply_changes(current, changes)
            self._dry_run(spec, self._open(stream.dataset))
        except ValidationError as exc:
            from pipelines import format_validation_error

            self._send(identity, "error", {"message": f"update refused: {format_validation_error(exc)}", "code": "invalid", "stream": stream.id, "request": message.get("request")})
            return
        except (ValueError, TypeError) as exc:
            self._send(identity, "error", {"message": f"update refused: {exc}", "code": "invalid", "stream": stream.id, "request": message.get("request")})
            return
        version, epoch, index = stream.update_spec(spec.to_dict())
        reply = {"stream": stream.id, "version": version, "from_epoch": epoch, "from_index": index, "spec": stream.spec, "request": message.get("request")}
        log.info("stream %s: pipeline version %d from batch %d of epoch %d", stream.id, version, index, epoch)
        self._send(identity, "updated", reply)
        if identity != stream.client:
            self._send(stream.client, "updated", {**reply, "request": None})

    def _attach(self, identity: bytes, message: P.Message) -> None:
        try:
            request = AttachRequest.model_validate(message.fields)
        except ValidationError as exc:
            from pipelines import format_validation_error

            self._send(identity, "error", {"message": format_validation_error(exc, "attach request"), "code": "invalid"})
            return
        try:
            stream = self._make_stream(identity, request)
        except ValidationError as exc:
            from pipelines import format_validation_error

            self._send(identity, "error", {"message": format_validation_error(exc), "code": "invalid"})
            return
        except (ValueError, TypeError) as exc:
            self._send(identity, "error", {"message": str(exc), "code": "invalid"})
            return
        except MemoryError:
            self._send(identity, "error", {"message": "the request needs more memory than this daemon has (dataset too large?)", "code": "invalid"})
            return
        self.streams[stream.id] = stream
        log.info("stream %s attached: %s/%s, pipeline %s, batch %d, rank %d/%d, %d batch(es) per epoch", stream.id, request.dataset, request.split, stream.spec.get("name") or "custom", request.batch_size, request.rank, request.world_size, stream.plan.num_batches())
        self._send(
            identity,
            "attached",
            {
                "stream": stream.id,
                "batches_per_epoch": stream.plan.num_batches(),
                "samples_per_epoch": stream.plan.shard_size(),
                "num_samples": stream.plan.num_samples,
                "start_epoch": stream.start_epoch,
                "skip": sorted(stream.skip),
                "pipeline_version": stream.pipeline_version,
                "spec": stream.spec,
                "dataset": self._describe(stream),
            },
        )

    def _describe(self, stream: Stream) -> dict:
        source = self._open(stream.dataset)
        return {"name": stream.request.dataset, "split": stream.request.split, "classes": list(source.classes), "channels": source.channels}

    def _open(self, dataset: dict):
        from .sources import open_dataset

        key = (dataset["ref"], dataset["split"], tuple(sorted(dataset["options"].items())))
        if key not in self.sources:
            self.sources[key] = open_dataset(dataset["ref"], split=dataset["split"], **dataset["options"])
        return self.sources[key]

    def _resolve_dataset(self, request: AttachRequest) -> dict:
        """Map the requested *name* to what workers open. Clients never pass paths."""
        if request.dataset in BUILTIN_DATASETS:
            ref = request.dataset
        elif request.dataset in self.config.datasets:
            ref = self.config.datasets[request.dataset]
        else:
            known = ", ".join(sorted([*BUILTIN_DATASETS, *self.config.datasets]))
            raise ValueError(f"unknown dataset {request.dataset!r}: this daemon serves {known}")
        return {"ref": ref, "split": request.split, "options": dict(request.dataset_options)}

    def _make_stream(self, identity: bytes, request: AttachRequest) -> Stream:
        if len(self.streams) >= self.config.max_streams:
            raise ValueError(f"this daemon already serves {len(self.streams)} streams (max_streams={self.config.max_streams})")
        if request.batch_size > self.config.max_batch_size:
            raise ValueError(f"batch_size {request.batch_size} exceeds this daemon's max_batch_size {self.config.max_batch_size}")
        check_address(request.data, "data address")  # the trainer's bound endpoint: a concrete port
        dataset = self._resolve_dataset(request)
        spec = _spec_from_request(request.pipeline)
        source = self._open(dataset)
        self._dry_run(spec, source)
        plan = EpochPlan(len(source), request.batch_size, request.seed, request.rank, request.world_size, request.shuffle, request.drop_last)
        start_epoch, skip = 0, set()
        if request.resume:
            start_epoch, skip = _parse_resume(request.resume, request.epochs, plan.num_batches())
        return Stream(uuid.uuid4().hex[:12], identity, request, plan, dataset, spec.to_dict(), start_epoch=start_epoch, skip=skip)

    @staticmethod
    def _dry_run(spec, source) -> None:
        """Sample and fuse the first image's parameters so a spec that cannot apply to this dataset
        (pca_color on grey images, a crop larger than the image) is refused at attach time."""
        import pipelines

        from .sources import CorruptImageError

        try:
            image = source.load(0)
        except CorruptImageError:
            return  # the stream will skip it; nothing to learn from it
        pipe = pipelines.build(spec.without_normalize())
        pipe.plans(pipe.sample_params([image.shape], seed=0))
        if spec.normalize is not None and len(spec.normalize.mean) not in (1, image.shape[2]):
            raise ValueError(f"normalize has {len(spec.normalize.mean)} mean values but {source.name} images have {image.shape[2]} channel(s)")

    def _end_stream(self, stream: Stream) -> None:
        self.streams.pop(stream.id, None)
        self.metrics.stream_ended(stream.id)
        for worker in self.workers.values():
            worker.tasks = {t: w for t, w in worker.tasks.items() if w[0] != stream.id}
            if not any(s.request.data == stream.request.data for s in self.streams.values()):
                self._send(worker.identity, "drop", {"data": stream.request.data})
        log.info("stream %s ended after %d acknowledged batch(es)", stream.id, stream.acked)

    # --- status ----------------------------------------------------------------------------------------

    def status(self) -> dict:
        now = time.monotonic()
        return {
            "address": self.address,
            "uptime_s": round(now - self._started, 1),
            "backend": self.config.backend,
            "device": self.config.device,
            "protocol": P.PROTOCOL_VERSION,
            "worker_restarts": self.worker_restarts,
            "skipped_corrupt": self.skipped_corrupt,
            "streams": [s.status() for s in self.streams.values()],
            "workers": [
                {
                    "worker": w.identity.decode(errors="replace"),
                    "pid": w.pid,
                    "host": w.host,
                    "backend": w.backend,
                    "device": w.device,
                    "busy": len(w.tasks),
                    "capacity": w.capacity,
                    "batches": w.done,
                    "images_per_s": round(w.rate.rate(now), 1),
                    "stage_ms": {k: round(v, 2) for k, v in w.times.mean_ms().items()},
                    "last_heard_s": round(now - w.last_heard, 2),
                }
                for w in self.workers.values()
            ],
            "queue": {"tasks_in_flight": sum(len(s.inflight) for s in self.streams.values()), "waiting_reissue": sum(len(s.reissue) for s in self.streams.values())},
        }


def _spec_from_request(value):
    """A spec sent by a peer: a preset name, a dict or YAML/JSON text — never a path the daemon would open."""
    import pipelines

    if isinstance(value, str) and "\n" not in value and value.strip().endswith((".yaml", ".yml", ".json")):
        raise ValueError("the daemon does not open spec files; send the spec itself (connect() reads a local file for you)")
    return pipelines.resolve(value)


def _parse_resume(state: dict, epochs: int, batches_per_epoch: int) -> tuple[int, set[int]]:
    """Validate a client's resume state: ``{"epoch": e, "delivered": [batch indices of e]}``."""
    try:
        epoch = int(state["epoch"])
        delivered = {int(i) for i in state.get("delivered", [])}
    except (KeyError, TypeError, ValueError):
        raise ValueError("resume state must look like {'epoch': int, 'delivered': [batch indices]}") from None
    if not 0 <= epoch <= epochs:
        raise ValueError(f"resume epoch {epoch} is outside this stream's {epochs} epoch(s)")
    if any(not 0 <= i < batches_per_epoch for i in delivered):
        raise ValueError(f"resume state names batch indices outside [0, {batches_per_epoch}); was it saved with another batch_size or dataset?")
    return epoch, delivered
