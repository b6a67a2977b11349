"""``mnist serve``: one supervisor, N worker processes, each an event loop with the model loaded once.

The supervisor checks the checkpoint (a bad one is a one-line error before anything starts), exports it to
ONNX once when onnxruntime runs it, reserves the port and starts the workers. On Linux each worker opens a
listening socket of its own on that port (SO_REUSEPORT) once its model is loaded, so the kernel spreads
connections over the workers that are ready, and only over those: a worker that is starting or has died
holds no socket that connections could queue on (they stalled for seconds there before). One shared socket
would let a busy worker's keep-alive clients pile up on it (measured: 16 connections on one of two
workers); where SO_REUSEPORT is missing, the workers share one socket anyway.

SIGTERM or Ctrl-C drains, losing nothing already accepted: ``/readyz`` turns 503, each worker takes the
connections waiting in its socket's backlog, closes the socket (new connections are then refused, not
reset), answers every request in flight (up to ``drain_timeout`` seconds) and exits. SIGHUP (the terminal
closed: every process of the server gets it) drains the same way.

A worker that dies is started again: at once if it had become ready (with a backoff once deaths come
faster than ``FAST_DEATHS`` a minute), after a backoff of 1, 2, 4 ... ``MAX_BACKOFF_S`` seconds if it died
while starting. The supervisor gives up (exit 2) only when no worker is ready and every worker has failed
to start ``MAX_START_FAILURES`` times in a row: nothing is serving and starting again does not help.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import gc
import logging
import multiprocessing
import os
import signal
import socket
import sys
import time
from dataclasses import fields, replace
from pathlib import Path
from typing import Callable, Union

import torch
import uvicorn

from ..config import ServeConfig
from ..device import check_processes_fit, oversubscribed, select_device, usable_cores
from ..errors import CannotWrite, UserError
from ..models import checkpoint
from ..runs import latest_checkpoint
from ..supervision import follow_parent
from ..terminal import heeded_hangup
from .backends import cached_export, export_cache_dir, export_for_serving, resolve_backend
from .fleet import Fleet
from .metrics import MULTIPROC_ENV
from .protocol import EdgeLimits, edge_protocol
from .resources import (WORKER_MEMORY, can_reuse_port, hold, metrics_folder, port_claim, scratch_folder,
                        start_resource_tracker)

log = logging.getLogger("mnist.serve")
MAX_AUTO_WORKERS = 8  # each worker holds its own model and torch (~300 MB): more cores than this rarely pay
MAX_START_FAILURES = 3  # starts in a row that died before becoming ready, per worker, before giving up
MAX_BACKOFF_S = 30.0  # the longest wait before starting a worker again
FAST_DEATHS = 5  # deaths of ready workers within a minute beyond which restarts back off too
# A worker's listening socket: its own on (host, port), opened when it is ready (SO_REUSEPORT), or one
# socket shared by all the workers (systems without SO_REUSEPORT, and the single-process server).
Listen = Union[socket.socket, tuple]


def plan(cfg: ServeConfig) -> ServeConfig:
    """``cfg`` with every automatic setting decided: the checkpoint, workers, threads, decoders, backend."""
    device = select_device(cfg.device)
    cores = usable_cores()
    workers = cfg.workers or (min(cores, MAX_AUTO_WORKERS) if device.type == "cpu" else 1)
    threads = cfg.threads or max(1, cores // workers)
    return replace(cfg, checkpoint=str(cfg.checkpoint or latest_checkpoint()), workers=workers, threads=threads,
                   max_decodes=cfg.max_decodes or threads, backend=resolve_backend(cfg.backend, device))


def edge_limits(cfg: ServeConfig) -> EdgeLimits:
    """The edge's limits: the ServeConfig fields of the same names."""
    return EdgeLimits(**{f.name: getattr(cfg, f.name) for f in fields(EdgeLimits)})


class DrainingServer(uvicorn.Server):
    """uvicorn's server, marking the app as draining (``/readyz`` -> 503) as soon as shutdown starts, telling
    ``on_ready`` when it listens, and taking its socket's backlog before closing it on shutdown (closing a
    listening socket resets the connections the kernel accepted for it and nobody took yet)."""

    def __init__(self, config: uvicorn.Config, app, on_ready: Callable[[], None] | None = None) -> None:  # noqa: ANN001
        super().__init__(config)
        self.app, self.on_ready, self.listeners = app, on_ready, []

    def handle_exit(self, sig: int, frame) -> None:  # noqa: ANN001 - signal handler signature
        self.app.state.draining = True
        super().handle_exit(sig, frame)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        self.listeners = list(sockets or [])
        if self.started and self.on_ready is not None:
            self.on_ready()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await self.take_backlog()
        await super().shutdown(sockets)  # closes the sockets first thing, with no await before

    async def take_backlog(self) -> None:
        """Accept every connection waiting in the listening sockets' backlogs, until none is left."""
        loop = asyncio.get_running_loop()
        protocol = functools.partial(self.config.http_protocol_class, config=self.config,
                                     server_state=self.server_state, app_state=self.lifespan.state)
        while waiting := [conn for sock in self.listeners for conn in _accept_waiting(sock)]:
            for conn in waiting:
                await loop.connect_accepted_socket(protocol, conn)


def _accept_waiting(sock: socket.socket) -> list[socket.socket]:
    """The connections in ``sock``'s backlog, accepted without blocking."""
    taken = []
    while True:
        try:
            conn, _ = sock.accept()
        except OSError:  # nothing waiting (BlockingIOError), or the socket is already closed
            return taken
        conn.setblocking(False)
        taken.append(conn)


def run_worker(cfg: ServeConfig, listen: Listen, onnx_path: Path | None, ready=None,  # noqa: ANN001 - an Event
               fleet: Fleet | None = None, supervisor: int | None = None, folder: Path | None = None) -> None:
    """One worker: load the model, open its socket, then serve until told to stop. ``ready`` (a
    multiprocessing Event) is set once it listens; under a ``supervisor`` (its pid) it stops when that dies.
    It holds the server's temporary ``folder`` while it runs, so no new server removes it under a worker that
    outlives a supervisor killed outright."""
    from .app import create_app  # imports FastAPI; after the thread settings below

    if supervisor is not None:  # a supervisor killed outright cannot stop its workers: they stop themselves
        follow_parent(supervisor)
    if folder is not None:
        with contextlib.suppress(OSError):  # no lock file: a file system without flock, the folder is never swept
            hold(folder)  # released by the kernel when this process ends
    torch.set_num_threads(cfg.threads)
    app = create_app(cfg, onnx_path, cfg.threads, fleet)
    # The ~1 M objects of torch, FastAPI and the model never become garbage; out of the collector's sight, a
    # full collection no longer walks them (it paused the worker for tens of ms: the p99 latency).
    gc.collect()
    gc.freeze()
    sock = listen if isinstance(listen, socket.socket) else open_listener(*listen, reuse_port=True)
    protocol = edge_protocol(edge_limits(cfg), app.state.metrics.refused)
    config = uvicorn.Config(app, http=protocol, loop="auto", lifespan="on", log_level="info", access_log=False,
                            timeout_keep_alive=cfg.keep_alive, timeout_graceful_shutdown=cfg.drain_timeout)
    server = DrainingServer(config, app, on_ready=ready.set if ready is not None else None)
    hangup_drains(server)
    server.run(sockets=[sock])


def hangup_drains(server: DrainingServer) -> None:
    """SIGHUP stops this process as SIGTERM does: it drains. A closed terminal sends it to the whole process
    group, and under its default action every worker died at once with the requests in flight."""
    if (sig := heeded_hangup()) is not None:
        signal.signal(sig, lambda _sig, frame: server.handle_exit(signal.SIGTERM, frame))


def _socket(host: str, port: int, reuse_port: bool) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def open_listener(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    """A listening socket on ``host:port`` (port 0: a free one)."""
    sock = _socket(host, port, reuse_port)
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


MIGRATE_SYSCTL = Path("/proc/sys/net/ipv4/tcp_migrate_req")  # Linux 5.14+


def migration_advice(workers: int) -> str | None:
    """A line for the log when a worker that dies would reset the connections waiting in its socket's backlog:
    Linux hands them to another worker's socket on the same port only with ``net.ipv4.tcp_migrate_req=1``
    (off by default; a system setting, per network namespace, that the server does not change itself). None
    when that is on, when the workers share one socket, or where the kernel has no such setting."""
    if not can_reuse_port(workers):
        return None
    try:
        if MIGRATE_SYSCTL.read_text().strip() != "0":
            return None
    except OSError:
        return None
    return ("mnist serve: net.ipv4.tcp_migrate_req is 0, so connections waiting for a worker that dies are reset; "
            "`sysctl -w net.ipv4.tcp_migrate_req=1` (Docker: --sysctl) hands them to the other workers")


def listeners(host: str, port: int, workers: int) -> tuple[socket.socket, list[Listen]]:
    """The supervisor's socket (it keeps the port: bound, and listening only when shared) and what each
    worker listens on: its own socket on the same port where SO_REUSEPORT allows, else the shared one. A
    bound socket that does not listen receives no connections."""
    if not can_reuse_port(workers):
        shared = open_listener(host, port)
        return shared, [shared] * workers
    keeper = _socket(host, port, reuse_port=True)
    return keeper, [(host, keeper.getsockname()[1])] * workers


def serve(cfg: ServeConfig) -> None:
    """Run ``mnist serve`` until SIGTERM or Ctrl-C."""
    requested = cfg.backend
    cfg = plan(cfg)
    # before any worker starts: --workers 1000 on a 24 GiB machine began spawning them, and was still running
    # 5 s after a SIGTERM
    check_processes_fit(cfg.workers, WORKER_MEMORY, "--workers", "workers")
    payload = checkpoint.load(cfg.checkpoint)
    checkpoint.model_from_payload(payload, cfg.checkpoint)  # a bad checkpoint: one line now, not N tracebacks
    keeper, listen = listeners(cfg.host, cfg.port, cfg.workers)
    address = keeper.getsockname()[:2]  # (IP, port): the port chosen when --port is 0
    port = address[1]
    with sigterm_unwinds(), port_claim(address, cfg.workers), scratch_folder() as tmp:  # SIGTERM: the folder goes too
        onnx_path, cfg = _onnx_export(cfg, payload, Path(tmp), fallback=requested == "auto")
        metrics = metrics_folder(Path(tmp), cfg.workers) if cfg.workers > 1 else None
        print(f"mnist serve: http://{cfg.host}:{port} with {cfg.workers} worker(s), {cfg.backend}, {cfg.threads} "
              f"thread(s) each, batches of up to {cfg.max_batch} within {cfg.max_wait_ms:g} ms", file=sys.stderr,
              flush=True)
        # only an explicit --workers or --threads gets here: the automatic plan shares out the cores
        if note := oversubscribed(cfg.workers * cfg.threads, f"{cfg.workers} worker(s) x {cfg.threads} thread(s)"):
            print(f"mnist serve: warning: {note}", file=sys.stderr, flush=True)
        if cfg.workers == 1:
            run_worker(cfg, keeper, onnx_path)
            return
        advice = migration_advice(cfg.workers)
        if advice:
            print(advice, file=sys.stderr, flush=True)
        os.environ[MULTIPROC_ENV] = str(metrics)  # before the workers start: they import prometheus_client
        Supervisor(cfg, listen, onnx_path, Path(tmp)).run()


class _Stopped(BaseException):
    """SIGTERM (or SIGHUP) reached the server before the supervisor took the signal over, or in the single-process
    server. Not an Exception: the exporter's catch-all (``_onnx_export``) must not take it for a failed export."""


def _raise_stopped(signum: int, frame) -> None:  # noqa: ANN001 - signal handler signature
    raise _Stopped


@contextlib.contextmanager
def sigterm_unwinds():
    """A SIGTERM inside ends the block as a normal return (exit status 0, as the supervisor's own stop, which
    installs its own handler inside).

    uvicorn drains on SIGTERM, then raises the signal again to end the process as the signal would. Under
    the default action that killed the single-process server before its temporary folder (the ONNX export
    and a copy of the checkpoint, up to 14 MB) was removed: one folder left in /tmp per stop, 369 of them
    (508 MB) on this VM after the test suite's runs. Raised as an exception instead, it unwinds every
    ``with`` block on its way out. SIGHUP too (a closed terminal), which would have killed the server as well,
    unless the server was started ignoring it (``nohup``)."""
    stops = [sig for sig in (signal.SIGTERM, heeded_hangup()) if sig is not None]
    previous = {sig: signal.signal(sig, _raise_stopped) for sig in stops}
    try:
        yield
    except _Stopped:
        pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _onnx_export(cfg: ServeConfig, payload: dict, folder: Path, fallback: bool) -> tuple[Path | None, ServeConfig]:
    """The ONNX file for an onnxruntime backend. When onnxruntime was only the automatic choice and the model
    does not export, or the export cannot be written, say which in one line and serve with torch instead."""
    if cfg.backend != "onnxruntime":
        return None, cfg
    try:
        return _export(cfg, payload, folder), cfg
    except CannotWrite as exc:  # the temporary folder is full or read-only: the model is not at fault
        if not fallback:
            raise UserError(f"--backend onnxruntime: {exc}") from None
        print(f"mnist serve: {exc}; serving with torch", file=sys.stderr, flush=True)
        return None, replace(cfg, backend="torch")
    except Exception as exc:  # noqa: BLE001 - whatever the exporter raises for a model it cannot trace
        if not fallback:
            raise UserError(f"--backend onnxruntime: the model does not export to ONNX ({str(exc)[:160]})") from None
        print(f"mnist serve: the model does not export to ONNX ({type(exc).__name__}); serving with torch",
              file=sys.stderr, flush=True)
        return None, replace(cfg, backend="torch")


def _export(cfg: ServeConfig, payload: dict, scratch: Path) -> Path:
    """The export from ``--export-cache`` (made there on the first start); in ``scratch`` when that folder
    cannot be written, saying so in one line."""
    cache = export_cache_dir(cfg.export_cache)
    if cache is not None:
        try:
            return cached_export(Path(cfg.checkpoint), cache, scratch)
        except (OSError, UserError) as exc:  # UserError: a write fileio refused, naming the file and why
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            print(f"mnist serve: cannot use the export cache {cache} ({reason}); exporting for this start only",
                  file=sys.stderr, flush=True)
    return export_for_serving(payload, scratch)


def ended(exitcode: int) -> str:
    """How a worker process ended, for the log: its exit code, or the signal that killed it, by name."""
    if exitcode >= 0:
        return f"exited with code {exitcode}"
    try:
        name = signal.Signals(-exitcode).name
    except ValueError:  # a real-time signal between SIGRTMIN and SIGRTMAX has no name of its own
        return f"was killed by signal {-exitcode}"
    if name == "SIGBUS":  # what a worker gets for a page of a mapped metric file that has no room on disk
        return "was killed by SIGBUS (a memory-mapped file could not grow: is the temporary folder's disk full?)"
    return f"was killed by {name}"


class Supervisor:
    """Starts the workers, starts again any that die (see the module's notes), and stops them all on
    SIGTERM/SIGINT/SIGHUP. What it knows goes to the workers' ``/readyz`` and ``/metrics`` through a Fleet."""

    def __init__(self, cfg: ServeConfig, listen: list[Listen], onnx_path: Path | None, folder: Path) -> None:
        self.cfg, self.listen, self.onnx_path, self.folder = cfg, listen, onnx_path, folder
        self.ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch threads or locks
        start_resource_tracker()  # before the Fleet's semaphores would start it, able to die of a SIGHUP
        n = len(listen)
        self.fleet = Fleet(self.ctx, n)
        self.procs: list[multiprocessing.process.BaseProcess | None] = [None] * n
        self.ready_events: list = [None] * n
        self.ready = [False] * n
        self.failures = [0] * n  # starts in a row that died before becoming ready
        self.due = [0.0] * n  # time.monotonic() at which an empty slot is started again
        self.since = [0.0] * n  # when the slot's worker started, or became ready
        self.deaths: collections.deque[float] = collections.deque()  # ready workers' deaths, last minute
        self.stopping = self.failed = False

    def _start(self, i: int) -> None:
        event = self.ctx.Event()
        args = (self.cfg, self.listen[i], self.onnx_path, event, self.fleet, os.getpid(), self.folder)
        proc = self.ctx.Process(target=run_worker, args=args, name=f"mnist-serve-worker-{i}", daemon=False)
        proc.start()
        self.procs[i], self.ready_events[i], self.ready[i], self.since[i] = proc, event, False, time.monotonic()

    def _stop(self, signum: int, _frame) -> None:  # noqa: ANN001 - signal handler signature
        self.stopping = True
        for proc in self.procs:
            if proc is not None and proc.is_alive():
                os.kill(proc.pid, signal.SIGTERM)  # Ctrl-C reaches the workers by itself; SIGTERM may not

    def run(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT, heeded_hangup()):
            if sig is not None:
                signal.signal(sig, self._stop)
        for i in range(len(self.procs)):
            self._start(i)
        while not self.stopping:
            time.sleep(0.05)
            self.tend()
        self._join()
        if self.failed:
            raise UserError(f"no worker is serving, and each failed to start {MAX_START_FAILURES} times in a row; "
                            "the lines above say why")

    def tend(self) -> None:
        """One look at every worker: note the ones that became ready, bury the dead, start the due."""
        now = time.monotonic()
        for i, proc in enumerate(self.procs):
            if proc is None:
                if now >= self.due[i] and not self.stopping:
                    self._start(i)
            elif proc.is_alive():
                if not self.ready[i] and self.ready_events[i].is_set():
                    self.ready[i], self.failures[i], self.since[i] = True, 0, now
            elif not self.stopping:
                self._bury(i, proc, now)
        self.fleet.set("ready", sum(self.ready))
        if not any(self.ready) and min(self.failures) >= MAX_START_FAILURES:  # a crash loop with nothing serving
            self.failed = True
            self._stop(signal.SIGTERM, None)

    def _bury(self, i: int, proc: multiprocessing.process.BaseProcess, now: float) -> None:
        from prometheus_client import multiprocess  # the metric files of a dead worker are dropped

        multiprocess.mark_process_dead(proc.pid)
        if self.ready[i]:
            self.fleet.add("died_serving")
            self.deaths.append(now)
            while self.deaths and now - self.deaths[0] > 60:
                self.deaths.popleft()
            delay = min(MAX_BACKOFF_S, 2.0 ** (len(self.deaths) - FAST_DEATHS)) if len(self.deaths) > FAST_DEATHS else 0
            when = f"after {now - self.since[i]:.1f} s serving"
        else:
            self.fleet.add("died_starting")
            self.failures[i] += 1
            delay = min(MAX_BACKOFF_S, 2.0 ** (self.failures[i] - 1))
            when = f"before it was ready ({self.failures[i]} in a row)"
        self.procs[i], self.ready[i], self.due[i] = None, False, now + delay
        print(f"mnist serve: worker {i} (pid {proc.pid}) {ended(proc.exitcode)} {when}; starting it again in "
              f"{delay:g} s", file=sys.stderr, flush=True)

    def _join(self) -> None:
        deadline = time.monotonic() + self.cfg.drain_timeout + 5  # drain, then lifespan shutdown and exit
        for proc in self.procs:
            if proc is not None:
                proc.join(max(0.0, deadline - time.monotonic()))
                if proc.is_alive():
                    proc.kill()
                    proc.join()
