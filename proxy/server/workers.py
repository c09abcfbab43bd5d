"""`serve --workers N`: one supervisor process and N worker processes sharing the public port.

Each worker is a fresh interpreter (`python -m proxy.cli serve ... --worker-fd FD`) running a full
`Proxy(role="worker")`: its public listener uses SO_REUSEPORT, so the kernel spreads incoming
connections over the workers, and it has no admin listener. The supervisor is a
`Proxy(role="supervisor")`: it forwards nothing and serves the one admin listener, with its own
connection to the shared PostgreSQL ledger (reports, budgets). It holds the public port bound but
never listening, so the port stays theirs while a worker restarts and `port: 0` works.

Supervisor and worker talk over a private socket pair, one JSON object per line. The worker
sends `state` every PUSH_INTERVAL and as it exits (its metric totals, readiness, in-flight
requests, reservations, CPU and memory) and `reloaded` to answer `reload`. Lifecycle:

* SIGTERM/SIGINT to the supervisor: SIGTERM to every worker (each drains like a single proxy),
  SIGKILL to those still running after `limits.drain_timeout` + STOP_GRACE; then it exits 0.
* SIGHUP or POST /admin/reload: the supervisor reloads first; a bad config stops there (every
  process keeps the running one), a good one is then reloaded by every worker, each answering.
* A worker that exits unexpectedly is started again after a delay: FIRST_BACKOFF, doubled up to
  MAX_BACKOFF while it keeps dying within STABLE_AFTER of its start.
* The supervisor gone, even SIGKILLed: each worker sees its socket close and stops gracefully.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client.core import Metric

from proxy.errors import ConfigError
from proxy.server import worker_metrics
from proxy.server.worker_metrics import PUSH_INTERVAL, Tally, WorkerSlot

if TYPE_CHECKING:
    from proxy.server.app import Proxy

log = logging.getLogger(__name__)

FIRST_BACKOFF, MAX_BACKOFF = 0.5, 30.0  # seconds before restarting a worker that died
STABLE_AFTER = 10.0  # a worker that ran this long restarts after FIRST_BACKOFF again
STOP_GRACE = 5.0  # beyond limits.drain_timeout, before stragglers are killed
STALE_AFTER = 5.0  # a worker silent this long is not ready (its event loop is stuck)
RELOAD_WAIT = 10.0  # how long a reload waits for the workers' answers
LINE_LIMIT = 64 * 1024 * 1024  # one state message (its size grows with the label series)


def reserve_port(host: str, port: int) -> socket.socket:
    """Bind (never listen on) `host:port` with SO_REUSEPORT: the workers' port, resolved if 0.

    A socket that does not listen gets no connections; it only keeps the port for the workers.
    Raises OSError when something else holds the port.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


class Supervisor:
    """Starts, watches, reloads and stops the workers of a `Proxy(role="supervisor")`."""

    def __init__(self, proxy: Proxy, command: Sequence[str], workers: int, reserved: socket.socket) -> None:
        self.proxy = proxy
        self.command = list(command)  # a worker's argv, without --port/--worker-fd/--worker-slot
        self.slots = [WorkerSlot(i) for i in range(workers)]
        self.reserved = reserved
        self.port = int(reserved.getsockname()[1])
        self._procs: dict[int, asyncio.subprocess.Process] = {}
        self._links: dict[int, asyncio.StreamWriter] = {}
        self._reloads: dict[tuple[int, int], asyncio.Future[str]] = {}
        self._reload_seq = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()
        proxy.fleet = self
        proxy.metrics.fleet = self
        proxy.port = self.port

    # -- Fleet (proxy/server/app.py) ---------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._keep(s), name=f"worker-{s.index}") for s in self.slots]
        config = self.proxy.config
        log.info(
            "together-meter supervisor: %d workers on http://%s:%d/v1 (admin http://%s:%d), upstream %s",
            len(self.slots),
            config.listen.host,
            self.port,
            config.admin.host,
            self.proxy.admin_port,
            config.upstream.url,
        )

    async def stop(self) -> None:
        """SIGTERM every worker, wait for their drain, SIGKILL the stragglers."""
        self._stopping.set()
        for proc in list(self._procs.values()):
            _signal(proc, signal.SIGTERM)
        if self._tasks:
            within = self.proxy.config.limits.drain_timeout + STOP_GRACE
            _, late = await asyncio.wait(self._tasks, timeout=within)
            if late:
                for index, proc in list(self._procs.items()):
                    log.error(
                        "worker %d (pid %d) still running after %.0f s: killing it", index, proc.pid, within
                    )
                    _signal(proc, signal.SIGKILL)
                await asyncio.wait(late, timeout=10)
        self.reserved.close()
        log.info("all workers stopped")

    async def reload(self) -> dict[str, str]:
        """Ask every running worker to reload its config; slot -> "ok" or what went wrong."""
        loop = asyncio.get_running_loop()
        self._reload_seq += 1
        seq = self._reload_seq
        answers: dict[str, str] = {}
        waiting: dict[int, asyncio.Future[str]] = {}
        for slot in self.slots:
            writer = self._links.get(slot.index)
            if writer is None or writer.is_closing():
                answers[str(slot.index)] = "not running: it reads the config file when it starts"
                continue
            waiting[slot.index] = self._reloads[(slot.index, seq)] = loop.create_future()
            writer.write(_line({"type": "reload", "id": seq}))
        if waiting:
            await asyncio.wait(waiting.values(), timeout=RELOAD_WAIT)
        for index, fut in waiting.items():
            self._reloads.pop((index, seq), None)
            answers[str(index)] = fut.result() if fut.done() else f"no answer within {RELOAD_WAIT:g} s"
            if answers[str(index)] != "ok":
                log.error("worker %d did not reload: %s", index, answers[str(index)])
        return dict(sorted(answers.items()))

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """(every worker ready, per slot: pid, ready, restarts and why not)."""
        now = asyncio.get_running_loop().time()
        view: dict[str, Any] = {}
        for s in self.slots:
            fresh = s.state_at is not None and now - s.state_at <= STALE_AFTER
            up = s.pid is not None and fresh and s.ready
            entry: dict[str, Any] = {"pid": s.pid, "ready": up, "restarts": s.restarts}
            if not up:
                entry["reason"] = (
                    "not running"
                    if s.pid is None
                    else "starting"
                    if s.state_at is None
                    else f"no news for more than {STALE_AFTER:g} s"
                    if not fresh
                    else "; ".join(s.reasons) or "not ready"
                )
            view[str(s.index)] = entry
        return all(e["ready"] for e in view.values()), view

    # -- MetricSource (proxy/server/metrics.py) -----------------------------------------------------

    def collect(self) -> Iterator[Metric]:
        return worker_metrics.collect(self.proxy.metrics, self.slots)

    # -- one slot ----------------------------------------------------------------------------

    async def _keep(self, slot: WorkerSlot) -> None:
        """Run the worker of `slot`; start it again whenever it dies, until the supervisor stops."""
        loop = asyncio.get_running_loop()
        delay = FIRST_BACKOFF
        while not self._stopping.is_set():
            started = loop.time()
            rc = await self._run_once(slot)
            if self._stopping.is_set():
                break
            delay = FIRST_BACKOFF if loop.time() - started >= STABLE_AFTER else delay
            slot.restarts += 1
            log.error(
                "worker %d exited unexpectedly (%s); starting it again in %.1f s (restart %d)",
                slot.index,
                _exit_text(rc),
                delay,
                slot.restarts,
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)
            delay = min(delay * 2, MAX_BACKOFF)

    async def _run_once(self, slot: WorkerSlot) -> int | None:
        """Start one worker for `slot`, follow its messages until it exits; its exit code."""
        ours, theirs = socket.socketpair()
        argv = [
            *self.command,
            *("--port", str(self.port), "--worker-fd", str(theirs.fileno())),
            *("--worker-slot", str(slot.index)),
        ]
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                pass_fds=(theirs.fileno(),),
                start_new_session=True,  # a terminal's Ctrl-C reaches the supervisor only
            )
        except OSError as exc:
            ours.close()
            log.error("worker %d could not be started: %s", slot.index, exc)
            return None
        finally:
            theirs.close()
        reader, writer = await asyncio.open_unix_connection(sock=ours, limit=LINE_LIMIT)
        slot.pid = proc.pid
        self._procs[slot.index], self._links[slot.index] = proc, writer
        log.info("worker %d started (pid %d)", slot.index, proc.pid)
        if self._stopping.is_set():
            _signal(proc, signal.SIGTERM)
        reading = asyncio.get_running_loop().create_task(self._follow(slot, reader))
        rc = await proc.wait()
        with contextlib.suppress(TimeoutError):  # its last state is in the socket already
            await asyncio.wait_for(reading, 2.0)
        del self._procs[slot.index], self._links[slot.index]
        writer.close()
        slot.retire()
        self._hold_reservations()
        for (index, _), fut in list(self._reloads.items()):
            if index == slot.index and not fut.done():
                fut.set_result("exited before answering")
        if self._stopping.is_set():
            log.info("worker %d (pid %d) stopped (%s)", slot.index, proc.pid, _exit_text(rc))
        return rc

    async def _follow(self, slot: WorkerSlot, reader: asyncio.StreamReader) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                line = await reader.readline()
            except (ValueError, ConnectionError) as exc:  # an overlong line, a reset
                log.warning("worker %d: bad message stream: %s", slot.index, exc)
                return
            if not line:
                return
            try:
                msg = json.loads(line)
                if msg["type"] == "state":
                    was_ready = slot.ready
                    slot.update(msg, loop.time())
                    self._hold_reservations()
                    if slot.ready and not was_ready:
                        log.info("worker %d ready (pid %d)", slot.index, slot.pid)
                elif msg["type"] == "reloaded":
                    fut = self._reloads.get((slot.index, msg["id"]))
                    if fut is not None and not fut.done():
                        fut.set_result("ok" if msg["error"] is None else str(msg["error"]))
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("worker %d: unreadable message (%s)", slot.index, type(exc).__name__)

    def _hold_reservations(self) -> None:
        """The supervisor's budget book shows the reservations its workers hold."""
        held: dict[tuple[str, str | None], int] = {}
        for slot in self.slots:
            for key, amount in slot.reserved.items():
                held[key] = held.get(key, 0) + amount
        self.proxy.budgets.hold(held)


class WorkerLink:
    """A worker's end of the socket pair: sends its state, answers reloads, stops with the supervisor."""

    def __init__(self, proxy: Proxy, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.proxy = proxy
        self.reader, self.writer = reader, writer
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        self._sent = Tally()  # the totals the supervisor has: each state carries what changed

    @classmethod
    async def connect(cls, proxy: Proxy, fd: int) -> WorkerLink:
        sock = socket.socket(fileno=fd)
        reader, writer = await asyncio.open_unix_connection(sock=sock, limit=LINE_LIMIT)
        return cls(proxy, reader, writer)

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._push()), loop.create_task(self._listen())]

    async def close(self) -> None:
        """Send the final state (after the proxy stopped: every row committed) and hang up."""
        self._closing = True
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        with contextlib.suppress(OSError, TimeoutError):
            self.writer.write(_line(await self.state(probe=False)))
            async with asyncio.timeout(5):
                await self.writer.drain()
                self.writer.close()
                await self.writer.wait_closed()

    async def state(self, *, probe: bool = True) -> dict[str, Any]:
        """This worker's state; send it right away (its tally holds what changed since the last)."""
        p = self.proxy
        writable = await p.ledger.writable()
        reachable = p.upstream.reachable or (probe and await p.upstream.probe())
        reasons = [
            text
            for failed, text in (
                (p.port == 0, "starting"),
                (not p.relay.accepting, "shutting down"),
                (not writable, "the ledger is not writable"),
                (not reachable, "the upstream cannot be reached"),
            )
            if failed
        ]
        sent, self._sent = self._sent, Tally.of(p.metrics)
        return {
            "type": "state",
            "pid": os.getpid(),
            "ready": not reasons,
            "reasons": reasons,
            "in_flight": p.metrics.in_flight,
            "tally": self._sent.changed_since(sent).to_wire(),
            "reserved": [[t, f, r] for (t, f), r in p.budgets.reservations().items()],
            "cpu_seconds": time.process_time(),
            "rss_bytes": _rss_bytes(),
        }

    async def _push(self) -> None:
        while True:
            try:
                self.writer.write(_line(await self.state()))
                await self.writer.drain()
            except (OSError, ConnectionError):
                return  # the supervisor is gone: _listen sees it too
            await asyncio.sleep(PUSH_INTERVAL)

    async def _listen(self) -> None:
        while True:
            try:
                line = await self.reader.readline()
            except (ValueError, ConnectionError):
                line = b""
            if not line:
                if not self._closing:
                    log.error("the supervisor is gone: stopping")
                    signal.raise_signal(signal.SIGTERM)  # the graceful stop of run_until_signalled
                return
            with contextlib.suppress(ValueError, KeyError, TypeError):
                msg = json.loads(line)
                if msg["type"] == "reload":
                    self.writer.write(_line(await self._reload(msg["id"])))

    async def _reload(self, seq: int) -> dict[str, Any]:
        try:
            await self.proxy.reload()
        except ConfigError as exc:
            log.error("config reload failed, keeping the running config: %s", exc)
            return {"type": "reloaded", "id": seq, "error": f"config reload failed: {exc}"}
        return {"type": "reloaded", "id": seq, "error": None}


async def serve_worker(proxy: Proxy, fd: int) -> None:
    """Run one worker: the proxy until SIGTERM (or its supervisor goes), its state sent meanwhile."""
    link = await WorkerLink.connect(proxy, fd)
    link.start()
    try:
        await proxy.run_until_signalled()
    finally:
        await link.close()


def worker_log_format(slot: int) -> None:
    """Log lines of a worker say which one (slot and pid)."""
    fmt = f"%(asctime)s %(levelname)s worker {slot} [%(process)d] %(name)s: %(message)s"
    for handler in logging.getLogger().handlers:
        handler.setFormatter(logging.Formatter(fmt))


def _line(msg: dict[str, Any]) -> bytes:
    return json.dumps(msg, separators=(",", ":")).encode() + b"\n"


def _signal(proc: asyncio.subprocess.Process, sig: signal.Signals) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)


def _exit_text(rc: int | None) -> str:
    if rc is None:
        return "not started"
    if rc < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-rc).name}"
    return f"exit code {rc}"


def _rss_bytes() -> int:
    """Resident memory of this process (Linux; 0 elsewhere)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
