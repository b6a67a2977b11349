import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import cores_to_spare, cpu_load_readable, run_cli, spinning
from mnist_classifier import device
from mnist_classifier.device import autocast_dtype, available_devices, select_device
from mnist_classifier.errors import UserError


def test_auto_picks_the_first_available_in_cuda_mps_cpu_order():
    order = [d for d in ("cuda", "mps", "cpu") if d in available_devices()]
    assert select_device("auto").type == order[0]


def test_cpu_is_always_available():
    assert select_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("name", ["cuda", "mps"])
def test_unavailable_device_is_a_clear_error(name):
    if name in available_devices():
        pytest.skip(f"{name} is available here")
    with pytest.raises(UserError, match=f"{name}.*not available"):
        select_device(name)


def test_precision_choices(monkeypatch):
    cpu = torch.device("cpu")
    assert autocast_dtype("fp32", cpu) is None
    assert autocast_dtype("bf16", cpu) is torch.bfloat16
    # auto: bf16 exactly when the CPU computes it natively
    for native, expected in ((True, torch.bfloat16), (False, None)):
        monkeypatch.setattr(device, "cpu_has_native_bf16", lambda native=native: native)
        assert autocast_dtype("auto", cpu) is expected
    with pytest.raises(UserError):
        autocast_dtype("fp8", cpu)


def cpu_flags() -> list[str]:
    """The first processor's flags, read here independently of device.py (the oracle for its answers)."""
    return next((line.split() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), [])


def test_native_bf16_is_read_from_the_cpu_flags():
    flags = cpu_flags()
    assert device.cpu_has_native_bf16() == ("amx_bf16" in flags or "avx512_bf16" in flags)


def test_amx_is_read_from_the_cpu_flags_and_onednns_cap(monkeypatch):
    """AMX counts where oneDNN may use it: ONEDNN_MAX_CPU_ISA at AVX512_CORE_BF16 (a Zen 4) or below holds it off."""
    flags = cpu_flags()
    amx = "amx_bf16" in flags
    for cap, expected in (("AVX2", False), ("AVX512_CORE_BF16", False), ("avx512_core_amx", amx), ("ALL", amx)):
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
        assert device.cpu_has_amx_bf16() is expected, cap


def test_a_onednn_cap_below_bf16_turns_auto_to_fp32(monkeypatch, data_dir, tmp_path):
    """ONEDNN_MAX_CPU_ISA=AVX2 (an AVX2 laptop, or this CPU run as one for BENCHMARKS.md) keeps oneDNN off the
    bf16 units, where bf16 would only be emulated: --precision auto then trains in fp32, here and in `mnist train`."""
    flags = cpu_flags()
    native = "amx_bf16" in flags or "avx512_bf16" in flags
    for cap, expected in (("AVX2", False), ("avx512_core", False), ("AVX512_CORE_BF16", native), ("ALL", native)):
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
        assert device.cpu_has_native_bf16() is expected, cap
    run = tmp_path / "run"
    proc = run_cli("train", "--epochs", "1", "--train-subset", "256", "--test-subset", "256", "--device", "cpu",
                   "--data-dir", str(data_dir), "--out", str(run), env={"ONEDNN_MAX_CPU_ISA": "AVX2"})
    assert proc.returncode == 0, proc.stderr
    assert json.loads((run / "summary.json").read_text())["precision"] == "fp32"


def test_flushed_denormals_become_zero_on_every_thread():
    # A fresh interpreter: the mode is per-thread state that torch's worker threads copy when they start.
    script = (
        "import torch; from mnist_classifier.device import flush_denormals\n"
        "ok = flush_denormals()\n"
        "a, b = torch.full((1 << 22,), 1e-30), torch.full((1 << 22,), 1e-10)  # product 1e-40: subnormal in fp32\n"
        "print(ok, torch.get_num_threads(), int((a * b != 0).sum()))\n"
        "torch.set_flush_denormal(False); print(int((a * b != 0).sum()))"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "2"}  # worker threads to check, whatever the suite's own setting
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120, env=env)
    supported, threads, nonzero_flushed, nonzero_plain = out.stdout.split()
    if supported == "False":
        pytest.skip("this CPU cannot flush denormals")
    assert int(nonzero_flushed) == 0, f"{nonzero_flushed} subnormal results with {threads} threads"
    assert int(nonzero_plain) > 0  # the main thread's share at least: the mode was what made them zero


# ---------------------------------------------------------------------------------------------------------------
# How busy the cores are (cpuload), read over the command's start-up


def test_a_start_mark_is_the_window_of_the_next_reading_only():
    from mnist_classifier import cpuload

    if not cpu_load_readable():
        pytest.skip("no /proc here")
    cpuload.mark_start()
    time.sleep(cpuload.MIN_WINDOW_S)  # the start-up, long enough to be the whole window
    t = time.monotonic()
    cpuload.busy_cores()
    assert time.monotonic() - t < 0.09  # read at once: no 0.1 s wait
    t = time.monotonic()
    cpuload.busy_cores()
    assert time.monotonic() - t >= cpuload.MIN_WINDOW_S  # the mark was used up: a fresh window, waited for


def test_a_mark_just_taken_still_gets_the_whole_window():
    from mnist_classifier import cpuload

    if not cpu_load_readable():
        pytest.skip("no /proc here")
    cpuload.mark_start()
    t = time.monotonic()
    cpuload.busy_cores()
    assert time.monotonic() - t >= cpuload.MIN_WINDOW_S * 0.9  # waits out the rest of the 0.1 s


@pytest.mark.serial
@pytest.mark.slow  # it needs a quiet machine: make test-fast runs serial tests beside others
def test_the_start_up_reading_leaves_out_this_process_and_sees_the_others(monkeypatch):
    from mnist_classifier import cpuload

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cores = cores_to_spare()

    def threads_after_own_work() -> int:
        cpuload.mark_start()
        until = time.monotonic() + 0.5
        while time.monotonic() < until:  # this process keeps a core busy, as importing torch does
            pass
        return device.threads_per_job(1)

    # this process's own work is not other work: all cores (once any blip of a finishing neighbour has passed)
    assert any(threads_after_own_work() == cores for _ in range(5))
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cores - 1)]
    try:
        time.sleep(0.5)
        assert threads_after_own_work() == 1  # every core but one is busy with other work
    finally:
        for p in spinners:
            p.kill()
            p.wait()


def test_proc_texts_of_another_layout_give_no_reading():
    from mnist_classifier.cpuload import parse

    own = "4242 (python x) R 1 2 3 4 5 6 7 8 9 10 11 12 13 14"  # utime 11 + stime 12 ticks (fields 14, 15)
    good = "cpu  9 9 9 9 9 9 9 9\ncpu0 1 0 2 10 3 0 0 0 0 0\ncpu1 5 5 5 5 5 5 5 5\nintr 1 2\n"
    assert parse(good, own, frozenset({0})) == (13, 16, 23)  # idle + iowait, all eight states, own
    assert parse(good, own, frozenset({0, 1})) == (23, 56, 23)
    for stat in ("cpu0 1 2\n", "cpu0 a b c d e f g h\n"):  # too few fields; not numbers
        assert parse(stat, own, frozenset({0})) is None
    assert parse(good, "4242 (python) R 1", frozenset({0})) is None  # /proc/self/stat cut short


def test_more_threads_than_cores_are_honoured_with_one_warning(data_dir, tmp_path):
    """An override is an override, but 1,000 threads on 2 cores took 40x as long: the user is told once."""
    from conftest import run_cli

    cores = device.usable_cores()
    assert device.oversubscribed(cores, "x") is None and device.oversubscribed(1, "x") is None
    note = device.oversubscribed(cores + 1, f"--threads {cores + 1}")
    assert note.startswith(f"--threads {cores + 1} is more than the {cores} core")
    run = tmp_path / "run"
    proc = run_cli("train", "--data-dir", str(data_dir), "--device", "cpu", "--train-subset", "256", "--test-subset",
                   "256", "--epochs", "1", "--out", str(run), "--threads", str(cores + 1))
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if "warning" in line]
    assert warnings == [f"mnist train: warning: {note}"]
    assert json.loads((run / "summary.json").read_text())["threads"] == cores + 1


# ---------------------------------------------------------------------------------------------------------------
# While a run trains: the policy reads the cores again (device.LoadFollower)


def test_only_the_policys_own_choice_is_followed(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert device.follows_load(0)
    assert not device.follows_load(2)  # --threads 2: the user's count stays, and so does the run's rounding
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert not device.follows_load(0)


@pytest.mark.serial
@pytest.mark.slow  # it needs a quiet machine: make test-fast runs serial tests beside others
def test_the_follower_gives_up_a_core_that_other_work_takes_and_takes_it_back():
    cores = cores_to_spare()
    before = torch.get_num_threads()
    torch.set_num_threads(cores)
    follower = device.LoadFollower(every_s=0.5)
    try:
        follower()
        assert torch.get_num_threads() == cores and follower.changes == []  # not yet: the window is too short
        with spinning(cores - 1):
            time.sleep(0.8)
            follower()
            assert torch.get_num_threads() == 1
        for _ in range(5):  # once any blip of the finished spinners has passed: all cores again
            time.sleep(0.6)
            follower()
            if torch.get_num_threads() == cores:
                break
        assert torch.get_num_threads() == cores
        assert [threads for _, threads in follower.changes] == [1, cores]
    finally:
        torch.set_num_threads(before)


@pytest.mark.serial
@pytest.mark.slow
def test_mnist_train_gives_up_a_core_to_a_neighbour_that_starts_while_it_trains(monkeypatch, data_dir, tmp_path):
    """A neighbour that starts after the start-up reading: `mnist train` drops to one thread while it trains,
    and says so in summary.json; with --threads the count stays."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cores = cores_to_spare()

    def train(run: Path, *extra: str) -> dict:
        cmd = [sys.executable, "-m", "mnist_classifier", "train", "--data-dir", str(data_dir), "--device", "cpu",
               "--epochs", "2", "--log-every", "20", "--no-tensorboard", "--out", str(run), *extra]
        env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        while "Loss:" not in proc.stdout.readline():  # training has begun: the start-up reading is long past
            assert proc.poll() is None, proc.stderr.read()
        with spinning(cores - 1):
            _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
        return json.loads((run / "summary.json").read_text())

    followed = train(tmp_path / "auto")
    assert followed["threads"] == 1, followed.get("threads_followed")
    assert [threads for _, threads in followed["threads_followed"]][-1] == 1
    # a given count is never followed; a subset, since beside the spinner its two threads took 157 s for 2 epochs
    fixed = train(tmp_path / "fixed", "--threads", str(cores), "--train-subset", "4096", "--epochs", "1")
    assert fixed["threads"] == cores and "threads_followed" not in fixed
