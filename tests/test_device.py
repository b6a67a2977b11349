import pytest
import torch

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


def test_precision_choices():
    cpu = torch.device("cpu")
    assert autocast_dtype("fp32", cpu) is None
    assert autocast_dtype("bf16", cpu) is torch.bfloat16
    assert autocast_dtype("auto", cpu) in (None, torch.bfloat16)
    with pytest.raises(UserError):
        autocast_dtype("fp8", cpu)
