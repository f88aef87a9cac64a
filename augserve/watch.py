"""``augserve status --watch``: a live terminal view of a daemon, refreshed every ``interval`` seconds.

:func:`render` turns one status dict (``Daemon.status()``, as :func:`augserve.status.fetch_status`
returns it) into a rich renderable — a pure function, tested on its own. :func:`watch` polls and
redraws it in place with :class:`rich.live.Live` until ``iterations`` polls are done or Ctrl-C. A daemon
that stops answering does not end the view: a red "daemon not answering" line replaces the header's
status and the last good tables stay (dimmed) while it keeps retrying.

Every string that comes from a peer (stream ids, dataset and pipeline names, worker names, hosts) is
shown as plain :class:`rich.text.Text`, never parsed as console markup.
"""

from __future__ import annotations

import time

import zmq
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.styled import Styled
from rich.table import Table
from rich.text import Text

from .status import fetch_status


def _uptime(seconds: float) -> str:
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    days, hours = divmod(hours, 24)
    return (f"{days}d " if days else "") + f"{hours:d}:{minutes:02d}:{secs:02d}"


def _ms(stage_ms: dict | None) -> str:
    stage_ms = stage_ms or {}
    return " / ".join(f"{float(stage_ms.get(stage, 0.0)):.1f}" for stage in ("load", "augment", "send"))


def _plain(value) -> Text:
    return Text(str(value))


def render_header(status: dict | None, address: str | None = None, error: str | None = None) -> Text:
    address = (status or {}).get("address", address) if address is None else address
    header = Text()
    header.append("augserve ", style="bold")
    header.append(str(address or "?"), style="bold cyan")
    if status:
        header.append(f"  up {_uptime(status.get('uptime_s', 0))}")
        header.append("  ")
        header.append(f"{status.get('backend', '?')} on {status.get('device', '?')}")
        header.append(f"  protocol v{status.get('protocol', '?')}")
        restarts = int(status.get("worker_restarts", 0))
        header.append(f"  worker restarts {restarts}", style="yellow" if restarts else "")
        skipped = int(status.get("skipped_corrupt", 0))
        header.append(f"  corrupt files skipped {skipped}", style="yellow" if skipped else "")
        queue = status.get("queue", {})
        header.append(f"\nqueue: {queue.get('tasks_in_flight', 0)} task(s) in flight, {queue.get('waiting_reissue', 0)} waiting for re-issue")
    if error:
        header.append("\n")
        header.append(f"daemon not answering: {error}", style="bold red")
    return header


def render_streams(streams: list[dict]) -> Table:
    table = Table(title=f"streams ({len(streams)})", title_justify="left", expand=False, show_edge=False, pad_edge=False)
    for name, justify in (
        ("stream", "left"), ("dataset/split", "left"), ("pipeline", "left"), ("epoch", "right"), ("acked", "right"),
        ("in flight/credits", "right"), ("img/s", "right"), ("load/augment/send ms", "right"),
    ):  # fmt: skip
        table.add_column(name, justify=justify, no_wrap=True)
    table.columns[0].min_width = max((len(str(s.get("stream", "?"))) for s in streams), default=0)  # ids never cut
    for s in streams:
        table.add_row(
            _plain(s.get("stream", "?")),
            _plain(f"{s.get('dataset', '?')}/{s.get('split', '?')}"),
            _plain(f"{s.get('pipeline', '?')} v{s.get('pipeline_version', '?')}"),
            f"{int(s.get('epoch', 0)) + 1}/{s.get('epochs', '?')}",
            str(s.get("acked", 0)),
            f"{s.get('in_flight', 0)}/{s.get('credits', 0)}",
            f"{float(s.get('images_per_s', 0.0)):.0f}",
            _ms(s.get("stage_ms")),
        )
    return table


def render_workers(workers: list[dict]) -> Table:
    table = Table(title=f"workers ({len(workers)})", title_justify="left", expand=False, show_edge=False, pad_edge=False)
    for name, justify in (
        ("worker", "left"), ("pid", "right"), ("host", "left"), ("busy/capacity", "right"), ("batches", "right"),
        ("img/s", "right"), ("load/augment/send ms", "right"), ("last heard", "right"),
    ):  # fmt: skip
        table.add_column(name, justify=justify, no_wrap=True)
    table.columns[0].min_width = max((len(str(w.get("worker", "?"))) for w in workers), default=0)
    for w in workers:
        busy, capacity = int(w.get("busy", 0)), int(w.get("capacity", 0))
        heard = float(w.get("last_heard_s", 0.0))
        table.add_row(
            _plain(w.get("worker", "?")),
            str(w.get("pid", "?")),
            _plain(w.get("host", "?")),
            Text(f"{busy}/{capacity}", style="green" if capacity and busy >= capacity else ""),
            str(w.get("batches", 0)),
            f"{float(w.get('images_per_s', 0.0)):.0f}",
            _ms(w.get("stage_ms")),
            Text(f"{heard:.1f} s ago", style="yellow" if heard > 2.0 else ""),
        )
    return table


def render(status: dict | None, *, address: str | None = None, error: str | None = None) -> RenderableType:
    """The whole view of one status dict: header, streams table, workers table.

    ``error`` (the daemon did not answer) adds a red line; ``status`` may then be the last good one
    (shown dimmed) or None (nothing heard yet)."""
    header = render_header(status, address, error)
    if not status:
        return header
    streams = status.get("streams", [])
    workers = status.get("workers", [])
    parts: list[RenderableType] = [header, Text("")]
    parts.append(render_streams(streams) if streams else Text("streams: none", style="dim"))
    parts.append(Text(""))
    parts.append(render_workers(workers) if workers else Text("workers: none", style="dim"))
    if error:  # the last good view, dimmed: its numbers are stale
        return Group(header, Styled(Group(*parts[1:]), style="dim"))
    return Group(*parts)


def watch(address: str, interval: float = 1.0, iterations: int | None = None, console: Console | None = None, timeout: float | None = None, credentials=None) -> dict | None:
    """Poll ``address`` every ``interval`` seconds and redraw; returns the last status received (or None).

    Ends after ``iterations`` polls (None: never) or on Ctrl-C, cleanly. A bad address raises
    ValueError before anything is drawn; a daemon that does not answer within ``timeout`` seconds
    (default: ``interval``, at least 1 s, at most 5 s) is shown as such and retried."""
    if not interval > 0:
        raise ValueError(f"--interval must be > 0, got {interval}")
    if iterations is not None and iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    from .config import check_address

    check_address(address, "daemon address")  # a typo is the user's error, not "not answering"
    if address.endswith(":*"):
        raise ValueError(f"bad daemon address {address!r}: a wildcard port can be bound, not connected to")
    timeout = min(5.0, max(1.0, interval)) if timeout is None else timeout
    console = console or Console()
    last: dict | None = None
    done = 0
    try:
        with Live(render(None, address=address), console=console, auto_refresh=False, transient=False, redirect_stdout=False, redirect_stderr=False) as live:
            while True:
                started = time.monotonic()
                error = None
                try:
                    last = fetch_status(address, timeout=timeout, credentials=credentials)
                except (ConnectionError, OSError, zmq.ZMQError) as exc:
                    error = str(exc) or type(exc).__name__
                live.update(render(last, address=address, error=error), refresh=True)
                done += 1
                if iterations is not None and done >= iterations:
                    break
                time.sleep(max(0.0, interval - (time.monotonic() - started)))
    except KeyboardInterrupt:
        pass
    return last
