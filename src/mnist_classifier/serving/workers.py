"""``mnist serve``: one supervisor, N worker processes, each an event loop with the model loaded once.

The supervisor checks the checkpoint (a bad one is a one-line error before anything starts), exports it to
ONNX once when onnxruntime runs it, binds the listening sockets and starts the workers. On Linux each worker
gets a socket of its own on the same port (SO_REUSEPORT), so the kernel spreads connections over the workers;
one shared socket lets a busy worker's keep-alive clients pile up on it (measured: 16 connections on one of
two workers). SIGTERM or Ctrl-C drains: the workers stop accepting, answer what is in flight (up to
``drain_timeout`` seconds) and exit. A worker that dies is started again.
"""

from __future__ import annotations

import gc
import logging
import multiprocessing
import os
import signal
import socket
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
import uvicorn

from ..config import ServeConfig
from ..device import select_device, usable_cores
from ..errors import UserError
from ..models import checkpoint
from ..runs import latest_checkpoint
from .backends import export_for_serving, resolve_backend
from .metrics import MULTIPROC_ENV
from .protocol import with_header_timeout

log = logging.getLogger("mnist.serve")
MAX_AUTO_WORKERS = 8  # each worker holds its own model and torch (~300 MB): more cores than this rarely pay
EARLY_DEATH_S, MAX_EARLY_DEATHS = 10.0, 3  # this many workers in a row dying this soon after starting: give up


def plan(cfg: ServeConfig) -> ServeConfig:
    """``cfg`` with every automatic setting decided: the checkpoint, workers, threads, decoders, backend."""
    device = select_device(cfg.device)
    cores = usable_cores()
    workers = cfg.workers or (min(cores, MAX_AUTO_WORKERS) if device.type == "cpu" else 1)
    threads = cfg.threads or max(1, cores // workers)
    return replace(cfg, checkpoint=str(cfg.checkpoint or latest_checkpoint()), workers=workers, threads=threads,
                   max_decodes=cfg.max_decodes or threads, backend=resolve_backend(cfg.backend, device))


class DrainingServer(uvicorn.Server):
    """uvicorn's server, marking the app as draining (``/readyz`` -> 503) as soon as shutdown starts."""

    def __init__(self, config: uvicorn.Config, app) -> None:  # noqa: ANN001 - the FastAPI app
        super().__init__(config)
        self.app = app

    def handle_exit(self, sig: int, frame) -> None:  # noqa: ANN001 - signal handler signature
        self.app.state.draining = True
        super().handle_exit(sig, frame)


def run_worker(cfg: ServeConfig, sock: socket.socket, onnx_path: Path | None) -> None:
    """One worker: load the model, then serve ``sock`` until told to stop."""
    from .app import create_app  # imports FastAPI; after the thread settings below

    torch.set_num_threads(cfg.threads)
    app = create_app(cfg, onnx_path, cfg.threads)
    # The ~1 M objects of torch, FastAPI and the model never become garbage; out of the collector's sight, a
    # full collection no longer walks them (it paused the worker for tens of ms: the p99 latency).
    gc.collect()
    gc.freeze()
    config = uvicorn.Config(app, http=with_header_timeout(cfg.header_timeout), loop="auto", lifespan="on",
                            log_level="info", access_log=False, timeout_keep_alive=cfg.keep_alive,
                            timeout_graceful_shutdown=cfg.drain_timeout)
    DrainingServer(config, app).run(sockets=[sock])


def bind(host: str, port: int, count: int) -> list[socket.socket]:
    """``count`` listening sockets on one port (SO_REUSEPORT where the system has it), else one shared socket."""
    reuse_port = hasattr(socket, "SO_REUSEPORT") and sys.platform.startswith("linux") and count > 1
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sockets: list[socket.socket] = []
    try:
        for _ in range(count if reuse_port else 1):
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, port))
            port = sock.getsockname()[1]  # port 0: the others join the port the first one got
            sock.listen(2048)
            sock.set_inheritable(True)
            sockets.append(sock)
    except OSError as exc:
        for sock in sockets:
            sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return [sockets[i % len(sockets)] for i in range(count)]


def serve(cfg: ServeConfig) -> None:
    """Run ``mnist serve`` until SIGTERM or Ctrl-C."""
    requested = cfg.backend
    cfg = plan(cfg)
    payload = checkpoint.load(cfg.checkpoint)
    checkpoint.model_from_payload(payload, cfg.checkpoint)  # a bad checkpoint: one line now, not N tracebacks
    sockets = bind(cfg.host, cfg.port, cfg.workers)
    port = sockets[0].getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="mnist-serve-") as tmp:
        onnx_path, cfg = _onnx_export(cfg, payload, Path(tmp), fallback=requested == "auto")
        print(f"mnist serve: http://{cfg.host}:{port} with {cfg.workers} worker(s), {cfg.backend}, {cfg.threads} "
              f"thread(s) each, batches of up to {cfg.max_batch} within {cfg.max_wait_ms:g} ms", file=sys.stderr,
              flush=True)
        if cfg.workers == 1:
            run_worker(cfg, sockets[0], onnx_path)
            return
        metrics_dir = Path(tmp) / "metrics"
        metrics_dir.mkdir()
        os.environ[MULTIPROC_ENV] = str(metrics_dir)  # before the workers start: they import prometheus_client
        Supervisor(cfg, sockets, onnx_path).run()


def _onnx_export(cfg: ServeConfig, payload: dict, folder: Path, fallback: bool) -> tuple[Path | None, ServeConfig]:
    """The ONNX file for an onnxruntime backend. When onnxruntime was only the automatic choice and the model
    does not export, say so in one line and serve with torch instead."""
    if cfg.backend != "onnxruntime":
        return None, cfg
    try:
        return export_for_serving(payload, folder), cfg
    except Exception as exc:  # noqa: BLE001 - whatever the exporter raises for a model it cannot trace
        if not fallback:
            raise UserError(f"--backend onnxruntime: the model does not export to ONNX ({str(exc)[:160]})") from None
        print(f"mnist serve: the model does not export to ONNX ({type(exc).__name__}); serving with torch",
              file=sys.stderr, flush=True)
        return None, replace(cfg, backend="torch")


class Supervisor:
    """Starts the workers, starts again any that die, and stops them all on SIGTERM/SIGINT."""

    def __init__(self, cfg: ServeConfig, sockets: list[socket.socket], onnx_path: Path | None) -> None:
        self.cfg, self.sockets, self.onnx_path = cfg, sockets, onnx_path
        self.ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch threads or locks
        self.procs: list[multiprocessing.process.BaseProcess | None] = [None] * len(sockets)
        self.started = [0.0] * len(sockets)  # time.monotonic() of each worker's latest start
        self.early_deaths = 0  # workers in a row that died within EARLY_DEATH_S of starting
        self.stopping = False
        self.failed = False

    def _start(self, i: int) -> None:
        proc = self.ctx.Process(target=run_worker, args=(self.cfg, self.sockets[i], self.onnx_path),
                                name=f"mnist-serve-worker-{i}", daemon=False)
        proc.start()
        self.procs[i], self.started[i] = proc, time.monotonic()

    def _stop(self, signum: int, _frame) -> None:  # noqa: ANN001 - signal handler signature
        self.stopping = True
        for proc in self.procs:
            if proc is not None and proc.is_alive():
                os.kill(proc.pid, signal.SIGTERM)  # Ctrl-C reaches the workers by itself; SIGTERM may not

    def run(self) -> None:
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        for i in range(len(self.procs)):
            self._start(i)
        while not self.stopping:
            time.sleep(0.2)
            self._restart_dead()
        self._join()
        if self.failed:
            raise UserError(f"workers kept dying within {EARLY_DEATH_S:g} s of starting; the lines above say why")

    def _restart_dead(self) -> None:
        from prometheus_client import multiprocess  # the workers' metric files of a dead worker are dropped

        for i, proc in enumerate(self.procs):
            if proc is None or proc.is_alive() or self.stopping:
                continue
            multiprocess.mark_process_dead(proc.pid)
            early = time.monotonic() - self.started[i] < EARLY_DEATH_S
            self.early_deaths = self.early_deaths + 1 if early else 0
            if self.early_deaths >= MAX_EARLY_DEATHS:  # a crash loop: restarting will not help
                self.failed = True
                self._stop(signal.SIGTERM, None)
                return
            print(f"mnist serve: worker {i} (pid {proc.pid}) exited with code {proc.exitcode}; starting it again",
                  file=sys.stderr, flush=True)
            time.sleep(1.0 if early else 0.0)  # a worker that dies at start must not spin the CPU
            self._start(i)

    def _join(self) -> None:
        deadline = time.monotonic() + self.cfg.drain_timeout + 5  # drain, then lifespan shutdown and exit
        for proc in self.procs:
            if proc is not None:
                proc.join(max(0.0, deadline - time.monotonic()))
                if proc.is_alive():
                    proc.kill()
                    proc.join()
