"""The daemon: one ROUTER socket for trainers and workers, an event loop and short handlers.

Control plane only — batches travel from workers straight to trainers. The loop decodes each message
into its typed model (:mod:`augserve.protocol`), checks the sender's role, and hands it to a short
handler. The decisions live beside it, each testable alone:

- :class:`~augserve.scheduler.Scheduler` — streams × workers × tasks, deadlines, attempts (pure);
- :class:`~augserve.supervisor.Supervisor` — the local worker processes;
- :class:`~augserve.admission.Admission` — datasets, specs and resume states, checked off the loop;
- :class:`~augserve.scaling.Autoscaler` — with ``workers: auto:MIN:MAX``, grows and shrinks the pool on
  the trainers' measured wait per batch (their ``credit`` reports) and on full result queues.

The pool is local processes, or Ray actors with ``ray`` (:class:`~augserve.ray_workers.RayPool`).

Shared memory (:mod:`augserve.handoff`): each stream's tasks say whether workers may hand its batches
over through shared memory; the daemon removes the slot names its exited workers left behind.

A handler that fails answers its peer with an ``error`` and the loop goes on: nothing a peer sends
can stop the daemon. With keys (the default) every connection is CurveZMQ-authenticated: only worker
keys may send worker messages, only client keys client messages, and only a stream's owner may re-tune
it; only the trainer's own connection may acknowledge or detach it.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
import uuid

import zmq

from . import protocol as P
from . import security
from .admission import Admission, Admitted, Refused
from .config import DaemonConfig
from .handoff.policy import StreamTransport, handoff_for
from .handoff.shm import reap_orphans
from .autoscale import AutoscaleSettings
from .metrics import DaemonMetrics, NullMetrics
from .scaling import Autoscaler
from .scheduler import Scheduler, SchedulerLimits, StreamFailure
from .streams import StreamState
from .supervisor import Supervisor

log = logging.getLogger("augserve.daemon")

MAX_ERROR_CHARS = 2000  # an error reply quotes at most this much of the problem
DAEMON_ACCEPTS = P.CLIENT_TO_DAEMON | P.WORKER_TO_DAEMON


class Daemon:
    """``Daemon(config).serve()`` runs until :meth:`stop` (or SIGINT/SIGTERM via :meth:`install_signal_handlers`)."""

    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.context = zmq.Context()
        self.socket: zmq.Socket | None = None
        self.address = config.bind
        self.keyring: security.Keyring | None = None
        self.gatekeeper: security.Gatekeeper | None = None
        liveness = config.heartbeat_interval * config.heartbeat_liveness
        self.scheduler = Scheduler(
            SchedulerLimits(config.task_timeout, config.delivery_timeout, config.max_attempts, worker_liveness=liveness, stream_liveness=2 * liveness)
        )
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_write, False)
        self.admission = Admission(config, self._wake)
        self.supervisor = self._pool()
        self.skipped_corrupt = 0
        self.refused = 0
        self.metrics = DaemonMetrics() if config.metrics_port is not None else NullMetrics()
        self.autoscaler: Autoscaler | None = None
        if config.autoscale is not None:
            settings = AutoscaleSettings(**config.autoscale.model_dump())
            self.autoscaler = Autoscaler(settings, self.supervisor, self.scheduler, self.metrics)
        self.metrics_port: int | None = None
        self._stopping = False
        self._started = time.monotonic()
        self._last_internal_error: dict[str, float] = {}
        self._handlers = {
            "ready": self._on_hello, "heartbeat": self._on_hello, "done": self._on_done, "failed": self._on_failed, "bye": self._on_bye,
            "attach": self._on_attach, "credit": self._on_credit, "detach": self._on_detach, "status": self._on_status, "update": self._on_update,
        }  # fmt: skip

    @property
    def secure(self) -> bool:
        return self.keyring is not None

    # --- lifecycle -------------------------------------------------------------------------------------

    def start(self) -> str:
        """Load keys, bind the control socket and start the local workers. Returns the bound address."""
        self._load_keys()
        self.socket = self.context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.ROUTER_MANDATORY, 1)  # sending to a vanished peer raises instead of vanishing
        self.socket.setsockopt(zmq.RCVHWM, 10_000)
        # Control messages are small: a peer announcing a huge frame is cut off by libzmq before it is buffered.
        self.socket.setsockopt(zmq.MAXMSGSIZE, P.MAX_HEADER_BYTES + 4096)
        if self.keyring is not None:
            security.secure_server(self.socket, self.keyring.daemon)
            self.gatekeeper = security.Gatekeeper(self.context, {role: self.keyring.allowed(role) for role in security.ROLES}).start()
        try:
            self.socket.bind(self.config.bind)
        except zmq.ZMQError as exc:
            self._close_socket()
            raise ValueError(f"cannot bind {self.config.bind}: {exc.strerror}") from None
        self.address = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        if self.address.startswith("ipc://"):
            os.chmod(self.address[len("ipc://") :], 0o600)  # only this user may connect
        if self.config.metrics_port is not None:
            try:
                self.metrics_port = self.metrics.start_http(self.config.metrics_port, self.config.metrics_host)
            except ValueError:
                self._close_socket()
                raise
            log.info("Prometheus metrics on %s", self.metrics.url)
        self._reap_slots()
        try:
            self.supervisor.start()
        except ValueError:
            self._close_socket()
            raise
        scale = self.config.autoscale
        kind = "Ray actor" if self.config.ray is not None else "local"
        log.info("augserve daemon on %s (%s) with %d %s %s worker(s) on %s%s", self.address, "CurveZMQ" if self.secure else "INSECURE: no authentication",
                 self.config.workers, kind, self.config.backend, self.config.device,
                 f"; autoscaling between {scale.min_workers} and {scale.max_workers} on data stall" if scale is not None else "")  # fmt: skip
        if self.autoscaler is not None:
            self.metrics.autoscale_observed(None, self.config.workers)
        return self.address

    def _pool(self):
        """The worker pool: local processes, or Ray actors (imported only then: Ray is an extra)."""
        if self.config.ray is None:
            return Supervisor(self._worker_command, self.config.workers)
        from .ray_workers import RayPool

        return RayPool(self.config, self._actor_options)

    def _actor_options(self):
        """What a Ray actor needs to join (called when the pool starts, after the socket is bound)."""
        from .ray_workers import ActorOptions

        return ActorOptions.for_daemon(self.config, self.actor_address, self.keyring)

    @property
    def actor_address(self) -> str:
        """Where Ray actors connect: ``ray.connect``, else the bound TCP address with a wildcard host made
        this host's address (actors may run on other nodes)."""
        ray = self.config.ray
        if ray is not None and ray.connect:
            return ray.connect
        from .ray_workers import reachable_address

        return reachable_address(self.address)

    def _load_keys(self) -> None:
        """Keys by default. Without them (``insecure``) only a loopback or ipc bind may start: anyone who
        reaches any other address could attach, register as a worker or re-tune streams."""
        config = self.config
        if config.insecure:
            if not security.is_loopback_address(config.bind):
                log.warning("binding %s WITHOUT authentication (--insecure): anyone who reaches it is trusted", config.bind)
            return
        # Fresh keys on a non-loopback bind would be useless (no other host has them): require existing ones.
        self.keyring = security.Keyring.load(config.keys_dir, create=security.is_loopback_address(config.bind))

    @property
    def worker_address(self) -> str:
        """Where local workers connect: the bound address, with a wildcard host made concrete."""
        address = self.address
        for wildcard in ("tcp://0.0.0.0:", "tcp://*:"):
            if address.startswith(wildcard):
                return "tcp://127.0.0.1:" + address[len(wildcard) :]
        return address

    def _worker_command(self, name: str) -> list[str]:
        config = self.config
        command = [
            sys.executable, "-m", "augserve", "--log-level", config.log_level, "worker",
            "--connect", self.worker_address,
            "--backend", config.backend,
            "--device", config.device,
            "--threads", str(config.threads_per_worker),
            "--capacity", str(config.tasks_per_worker),
            "--heartbeat-interval", str(config.heartbeat_interval),
            "--heartbeat-liveness", str(config.heartbeat_liveness),
            "--local",
            "--name", name,
            "--shm-dir", config.shm_dir,
            "--shm-reserve-mb", str(config.shm_reserve_mb),
        ]  # fmt: skip
        if self.keyring is not None:
            command += ["--keys-dir", str(self.keyring.directory)]
        else:
            command += ["--insecure"]
        return command

    def stop(self) -> None:
        self._stopping = True
        self._wake()

    def install_signal_handlers(self) -> None:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: self.stop())

    def _wake(self) -> None:
        try:
            os.write(self._wake_write, b"w")
        except (BlockingIOError, OSError):
            pass  # already awake (the pipe is full) or closing

    def serve(self) -> None:
        if self.socket is None:
            self.start()
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        poller.register(self._wake_read, zmq.POLLIN)
        interval = self.config.heartbeat_interval
        next_housekeeping = time.monotonic()
        try:
            while not self._stopping:
                events = dict(poller.poll(timeout=int(min(interval, 0.2) * 1000)))
                if self._wake_read in events:
                    os.read(self._wake_read, 4096)
                if self.socket in events:
                    for _ in range(10_000):  # drain what is waiting, then schedule once
                        try:
                            frames = self.socket.recv_multipart(flags=zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self._dispatch(frames)
                for context, result in self.admission.results():
                    self._guarded(context[1], context[0], lambda: self._on_admitted(context, result))
                now = time.monotonic()
                if now >= next_housekeeping:
                    self._survive("housekeeping", self._housekeeping, now)
                    next_housekeeping = now + interval / 2
                self._survive("scheduling", self._schedule, now)
        finally:
            self.close()

    def close(self) -> None:
        """Stop workers, close the socket, release everything. Safe to call twice."""
        self.metrics.stop()
        if self.socket is None:
            return
        for stream in list(self.scheduler.streams.values()):  # trainers learn at once instead of after their timeout
            self._send(stream.identity, P.StreamError(stream=stream.id, message="the daemon is shutting down", kind="shutdown"))
        for identity in list(self.scheduler.workers):
            self._send(identity, P.Stop())
        self.supervisor.stop()
        self._reap_slots()  # of workers killed after overstaying their stop
        self.admission.close()
        self._close_socket()
        for fd in (self._wake_read, self._wake_write):
            os.close(fd)
        self.context.term()
        if self.address.startswith("ipc://"):
            try:
                os.unlink(self.address[len("ipc://") :])
            except OSError:
                pass
        log.info("augserve daemon stopped")

    def _close_socket(self) -> None:
        if self.gatekeeper is not None:
            self.gatekeeper.stop()
            self.gatekeeper = None
        if self.socket is not None:
            self.socket.close(linger=0)
            self.socket = None

    # --- dispatch --------------------------------------------------------------------------------------

    def _dispatch(self, frames) -> None:
        identity = frames[0].bytes
        if len(frames) < 2:
            return
        try:
            message = P.decode(frames[1:], DAEMON_ACCEPTS)
        except P.ProtocolError as exc:
            self.refused += 1
            log.info("refused a message from %r: %s", identity[:16], exc)
            self._error(identity, str(exc), "protocol")
            return
        peer = security.peer(frames[1]) if self.secure else None
        role = "worker" if message.type in P.WORKER_TO_DAEMON else "client"
        if self.secure and (peer is None or peer[0] != role):
            self.refused += 1
            log.warning("refused a %s message from %r: its key is not a %s key", message.type, identity[:16], role)
            self._error(identity, f"'{message.type}' is a {role} message and this connection's key is not a {role} key", "forbidden")
            return
        owner = f"{peer[0]}:{peer[1]}" if peer is not None else identity.hex()
        handler = self._handlers[message.type]
        self._guarded(identity, message.type, lambda: handler(identity, owner, message.body))

    def _guarded(self, identity: bytes, what: str, call) -> None:
        """Run one handler; whatever it raises becomes an error reply to that peer, never a stopped loop."""
        try:
            call()
        except Refused as exc:
            self._error(identity, str(exc), exc.code)
        except Exception as exc:
            log.warning("handling %s from %r failed", what, identity[:16], exc_info=True)
            self._error(identity, f"bad {what} message: {type(exc).__name__}: {exc}", "bad_request")

    def _survive(self, what: str, call, now: float) -> None:
        """The loop's own periodic work: a bug in it is logged (once a minute at most), never fatal."""
        try:
            call(now)
        except Exception:
            if now - self._last_internal_error.get(what, -60.0) >= 60.0:
                self._last_internal_error[what] = now
                log.exception("internal error in %s (the daemon carries on)", what)

    # --- workers ---------------------------------------------------------------------------------------

    def _on_hello(self, identity: bytes, owner: str, hello: P.Hello) -> None:
        known = identity in self.scheduler.workers
        worker = self.scheduler.add_worker(identity, hello, time.monotonic())
        if not known:
            log.info("worker %s joined (pid %d on %s, %s/%s)", worker.name, hello.pid, hello.host, hello.backend, hello.device)

    def _on_bye(self, identity: bytes, owner: str, body: P.Bye) -> None:
        self._forget_worker(identity, "left")

    def _on_done(self, identity: bytes, owner: str, report: P.Done) -> None:
        stream = self.scheduler.done(identity, report, time.monotonic())
        if stream is not None:
            stream.transport.count(report)
        self.skipped_corrupt += report.skipped
        self.metrics.batch_done(stream.id if stream is not None else None, identity.decode(errors="replace"), report.samples, report.skipped, report.times.model_dump())

    def _on_failed(self, identity: bytes, owner: str, report: P.Failed) -> None:
        failure = self.scheduler.failed(identity, report, time.monotonic())
        if failure is not None:
            self._fail_stream(failure)
        elif report.stream in self.scheduler.streams:
            log.info("task %s failed on %s (%s): %s; retrying", report.task, identity.decode(errors="replace"), report.kind, report.message[:200])

    def _forget_worker(self, identity: bytes, reason: str) -> None:
        if identity not in self.scheduler.workers:
            return
        requeued, failures = self.scheduler.remove_worker(identity, reason)
        self.metrics.worker_left(identity.decode(errors="replace"))
        log.info("worker %s gone (%s); %d task(s) re-queued", identity.decode(errors="replace"), reason, requeued)
        for failure in failures:
            self._fail_stream(failure)

    # --- trainers --------------------------------------------------------------------------------------

    def _on_status(self, identity: bytes, owner: str, body: P.Status) -> None:
        self._send(identity, P.StatusReply(status=self.status()))

    def _on_attach(self, identity: bytes, owner: str, request: P.Attach) -> None:
        self._check_quota(owner)
        self.admission.submit(lambda: self.admission.admit(request), ("attach", identity, owner, request))

    def _check_quota(self, owner: str) -> None:
        streams = self.scheduler.streams
        if len(streams) + self.admission.pending >= self.config.max_streams:
            raise Refused(f"this daemon already serves {len(streams)} streams (max_streams={self.config.max_streams})", "limit")
        mine = self.scheduler.streams_of(owner)
        if mine >= self.config.max_streams_per_client:
            raise Refused(f"this client already has {mine} streams (max_streams_per_client={self.config.max_streams_per_client})", "limit")

    def _on_credit(self, identity: bytes, owner: str, credit: P.Credit) -> None:
        stream = self._own_stream(identity, credit.stream)
        if stream is None:
            return
        self.scheduler.credit(stream, credit, time.monotonic())
        if credit.wait is not None and self.autoscaler is not None:
            self.autoscaler.observe_wait(credit.wait.batches, credit.wait.seconds)
        if credit.final and stream.finished():
            self._end_stream(stream.id)

    def _on_detach(self, identity: bytes, owner: str, detach: P.Detach) -> None:
        if self._own_stream(identity, detach.stream) is not None:
            self._end_stream(detach.stream)

    def _own_stream(self, identity: bytes, stream_id: str) -> StreamState | None:
        """The stream, if this connection is the trainer that attached it; else an error reply."""
        stream = self.scheduler.streams.get(stream_id)
        if stream is None or stream.identity != identity:
            self._error(identity, f"unknown stream {stream_id!r} (the daemon may have restarted)", "unknown_stream", stream=stream_id)
            return None
        return stream

    def _on_update(self, identity: bytes, owner: str, update: P.Update) -> None:
        """Live re-tuning, by the trainer or from outside it (`augserve tune set`) with the owner's key."""
        stream = self.scheduler.streams.get(update.stream)
        if stream is None:
            self._error(identity, f"unknown stream {update.stream!r} (the daemon may have restarted)", "unknown_stream", stream=update.stream, request=update.request)
            return
        if self.secure and owner != stream.owner:
            self._error(identity, f"stream {stream.id} belongs to another client key; only its owner may re-tune it", "forbidden", stream=stream.id, request=update.request)
            return
        dataset, current, batch_size = stream.dataset, stream.spec, stream.request.batch_size
        self.admission.submit(lambda: self.admission.check_update(dataset, current, update, batch_size), ("update", identity, owner, update))

    def _on_admitted(self, context: tuple, result) -> None:
        kind, identity, owner, request = context
        if isinstance(result, Refused):
            prefix = "update refused: " if kind == "update" else ""
            self._error(identity, prefix + str(result), result.code, **({"stream": request.stream, "request": request.request} if kind == "update" else {}))
        elif kind == "attach":
            self._check_quota(owner)
            self._add_stream(identity, owner, request, result)
        else:
            self._apply_update(identity, request, result)

    def _add_stream(self, identity: bytes, owner: str, request: P.Attach, admitted: Admitted) -> None:
        now = time.monotonic()
        stream = StreamState(
            uuid.uuid4().hex[:12], owner, identity, request, admitted.plan, admitted.dataset, admitted.spec, admitted.fingerprint,
            start_epoch=admitted.start_epoch, skip=admitted.skip, last_heard=now,
        )  # fmt: skip
        handoff, transport = handoff_for(request, self.config.transport)
        stream.transport = StreamTransport.of(request, self.config.transport)
        self.scheduler.add_stream(stream, handoff)
        log.info("stream %s attached: %s/%s, pipeline %s, batch %d, rank %d/%d, %d batch(es) per epoch; transport %s", stream.id, request.dataset,
                 request.split, stream.spec.get("name") or "custom", request.batch_size, request.rank, request.world_size, stream.plan.num_batches(),
                 transport)  # fmt: skip
        worker_keys = sorted(k.decode() for k in self.keyring.allowed("worker")) if self.keyring is not None else []
        self._send(
            identity,
            P.Attached(
                stream=stream.id, batches_per_epoch=stream.plan.num_batches(), samples_per_epoch=stream.plan.shard_size(),
                num_samples=stream.plan.num_samples, start_epoch=stream.start_epoch, skip=sorted(stream.skip),
                pipeline_version=stream.pipeline_version, spec=stream.spec, dataset=admitted.info, fingerprint=admitted.fingerprint,
                worker_keys=worker_keys, max_batch_bytes=self.config.max_batch_bytes,
            ),  # fmt: skip
        )

    def _apply_update(self, identity: bytes, update: P.Update, spec: dict) -> None:
        stream = self.scheduler.streams.get(update.stream)
        if stream is None:
            self._error(identity, f"stream {update.stream!r} ended before its update was checked", "unknown_stream", stream=update.stream, request=update.request)
            return
        version, epoch, index = stream.update_spec(spec)
        log.info("stream %s: pipeline version %d from batch %d of epoch %d", stream.id, version, index, epoch)
        reply = P.Updated(stream=stream.id, version=version, from_epoch=epoch, from_index=index, spec=stream.spec, request=update.request)
        self._send(identity, reply)
        if identity != stream.identity:  # the trainer learns of it too, whoever asked
            self._send(stream.identity, reply.model_copy(update={"request": None}))

    def _end_stream(self, stream_id: str) -> None:
        stream, drops = self.scheduler.remove_stream(stream_id)
        if stream is None:
            return
        self.metrics.stream_ended(stream_id)
        for worker, data in drops:
            self._send(worker, P.Drop(data=data))
        log.info("stream %s ended after %d acknowledged batch(es)", stream_id, stream.acked)

    def _fail_stream(self, failure: StreamFailure) -> None:
        stream = self.scheduler.streams.get(failure.stream)
        if stream is None:
            return
        log.warning("stream %s: %s", stream.id, failure.message)
        self._send(stream.identity, P.StreamError(stream=stream.id, message=failure.message[:MAX_ERROR_CHARS], kind=failure.kind))
        self._end_stream(stream.id)

    # --- the loop's periodic work ----------------------------------------------------------------------

    def _reap_slots(self) -> None:
        """Remove the shared-memory slot names that exited workers (ours or not) left in ``shm_dir``."""
        reaped = reap_orphans(self.config.shm_dir)
        if reaped:
            log.info("removed %d shared-memory slot(s) left by exited workers from %s", len(reaped), self.config.shm_dir)

    def _housekeeping(self, now: float) -> None:
        exited = self.supervisor.poll_exits(now)
        for name, retired in exited:
            if not retired:
                self.metrics.worker_restarted()
            self._forget_worker(name.encode(), "retired" if retired else "exited")
        if exited:
            self._reap_slots()
        expired = self.scheduler.expire(now)
        for worker in expired.silent_workers:
            log.info("worker %s written off: silent", worker.name)
            self.metrics.worker_left(worker.name)
            self.supervisor.kill(worker.name)  # one of ours, hung: restarted at the next poll
        if expired.reissued:
            log.info("%d task(s) past their deadline re-issued", expired.reissued)
        for failure in expired.failures:
            self._fail_stream(failure)
        for stream_id in expired.silent_streams:
            log.warning("stream %s: trainer silent; dropping it", stream_id)
            self._end_stream(stream_id)
        if self.autoscaler is not None:
            for name in self.autoscaler.tick(now):
                log.info("worker %s drained; telling it to stop", name)
                self._send(name.encode(), P.Stop())
        for identity in list(self.scheduler.workers):
            self._send(identity, P.Ping())
        self.metrics.update_from_status(self.status)

    def _schedule(self, now: float) -> None:
        for assignment in self.scheduler.assign(now):
            if not self._send(assignment.worker, assignment.message):
                for failure in self.scheduler.unreachable(assignment.worker):
                    self._fail_stream(failure)

    def _send(self, identity: bytes, body: P.Body) -> bool:
        try:
            self.socket.send_multipart([identity, *P.encode(body)], flags=zmq.NOBLOCK)
            return True
        except zmq.ZMQError as exc:  # EHOSTUNREACH (peer gone) or a full queue
            log.debug("could not send %s to %r: %s", body.type, identity[:16], exc)
            return False

    def _error(self, identity: bytes, message: str, code: str, stream: str | None = None, request: str | None = None) -> None:
        if len(message) > MAX_ERROR_CHARS:
            message = message[: MAX_ERROR_CHARS - 3] + "..."
        self._send(identity, P.Error(message=message, code=code[:32], stream=stream, request=request))

    # --- status ----------------------------------------------------------------------------------------

    def status(self) -> dict:
        now = time.monotonic()
        scheduler = self.scheduler
        return {
            "address": self.address,
            "uptime_s": round(now - self._started, 1),
            "backend": self.config.backend,
            "device": self.config.device,
            "protocol": P.PROTOCOL_VERSION,
            "secure": self.secure,
            "worker_restarts": self.supervisor.restarts,
            "skipped_corrupt": self.skipped_corrupt,
            "refused_messages": self.refused,
            "reissued_tasks": scheduler.reissued_total,
            "streams": [s.status(now) for s in scheduler.streams.values()],
            "workers": [
                {
                    "worker": w.name,
                    "pid": w.hello.pid,
                    "host": w.hello.host,
                    "backend": w.hello.backend,
                    "device": w.hello.device,
                    "busy": len(w.tasks),
                    "capacity": w.hello.capacity,
                    "batches": w.done,
                    "images_per_s": round(w.rate.rate(now), 1),
                    "stage_ms": {k: round(v, 2) for k, v in w.times.mean_ms().items()},
                    "last_heard_s": round(now - w.last_heard, 2),
                }
                for w in scheduler.workers.values()
            ],
            "queue": {"tasks_in_flight": scheduler.in_flight(), "waiting_reissue": scheduler.waiting_reissue()},
            "autoscale": self.autoscaler.status() if self.autoscaler is not None else None,
        }
