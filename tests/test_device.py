import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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


def test_native_bf16_is_read_from_the_cpu_flags():
    flags = next((line.split() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), [])
    assert device.cpu_has_native_bf16() == ("amx_bf16" in flags or "avx512_bf16" in flags)


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
