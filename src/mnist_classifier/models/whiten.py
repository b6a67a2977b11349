"""A data-dependent start for a network's first convolution (``--whiten-init``).

The first layer's filters are set to the principal components of the patches it will see, each scaled so
its output has unit variance on the sample, and each with its negative (a ReLU after it keeps both signs'
information). The layer then starts out as a whitening of its input: the directions in which the images
vary most, decorrelated, which the rest of the network learns from faster than from random filters. Fast
CIFAR-10 training recipes use the same start. On MNIST's validation split, one epoch of the fast recipe scored
99.001 % with it against 98.946 % without, over 10 seeds, in the same training time (BENCHMARKS.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError

SAMPLE_IMAGES = 2000  # images whose patches are counted (the first ones of the training split): 288,000 patches
# of the fast recipe's 36 values, ample for a 36 x 36 covariance
MAX_PATCHES = 1 << 22  # fewer images where they are large (EfficientNet at 512 px: 64): bounded time
CHUNK_IMAGES = 500  # images per forward pass, and fewer where they are large:
CHUNK_PATCHES = 1 << 19  # at most this many patches at once: bounded memory (~75 MB at 36 values)
EPS = 1e-3  # added to each eigenvalue, as a share of their mean: near-flat directions do not blow up


class _Captured(Exception):
    """Raised by the hook to stop the forward pass once the first convolution's input is in hand."""

    def __init__(self, x: torch.Tensor) -> None:
        super().__init__()
        self.x = x


def first_conv(model: nn.Module) -> nn.Conv2d:
    """The first ``nn.Conv2d`` the model registers (the first its forward pass applies, in this package's
    models). A UserError where there is none or it is grouped."""
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None:
        raise UserError("--whiten-init: the model has no convolution to start from the data")
    if conv.groups != 1:
        raise UserError("--whiten-init: the model's first convolution is grouped; it needs a full one")
    return conv


def conv_inputs(model: nn.Module, conv: nn.Conv2d, images: torch.Tensor) -> torch.Tensor:
    """What ``conv`` receives when ``model`` is given ``images`` (B, C, H, W): the model runs up to it only,
    in eval mode and without gradients, so nothing in it (batch-norm statistics) changes."""
    def hook(_module: nn.Module, args: tuple) -> None:
        raise _Captured(args[0])

    handle, was_training = conv.register_forward_pre_hook(hook), model.training
    model.eval()
    try:
        with torch.no_grad():
            model(images)
    except _Captured as got:
        return got.x
    finally:
        handle.remove()
        model.train(was_training)
    raise UserError("--whiten-init: the model's forward pass never reached its first convolution")


def patch_covariance(model: nn.Module, conv: nn.Conv2d, images: torch.Tensor) -> torch.Tensor:
    """The covariance (D, D) of ``conv``'s input patches, D = in_channels x kernel height x kernel width, over
    ``images``, at most MAX_PATCHES of them: each chunk's sums in float32 on the images' device, added up in
    float64 on the CPU."""
    def patches(x: torch.Tensor) -> torch.Tensor:  # (B, D, L): every kernel-sized window of conv's input
        return F.unfold(x.float(), conv.kernel_size, conv.dilation, conv.padding, conv.stride)

    per_image = patches(conv_inputs(model, conv, images[:1])).shape[-1]  # L patches per image
    n, chunk = max(1, MAX_PATCHES // per_image), max(1, min(CHUNK_IMAGES, CHUNK_PATCHES // per_image))
    total, outer, count = 0.0, 0.0, 0
    for batch in images[:n].split(chunk):
        p = patches(conv_inputs(model, conv, batch))  # (B, D, L)
        p = p.transpose(1, 2).reshape(-1, p.shape[1])  # (B * L, D)
        total = total + p.sum(0).cpu().double()  # float64 on the CPU: MPS has none
        outer = outer + (p.T @ p).cpu().double()
        count += len(p)
    mean = total / count
    return outer / count - torch.outer(mean, mean)


@torch.no_grad()
def whiten_first_conv(model: nn.Module, images: torch.Tensor) -> int:
    """Set the first convolution's filters from the first SAMPLE_IMAGES of ``images`` (the training split, as
    the model is fed: normalised, on the model's device; fewer where large images exceed MAX_PATCHES).
    Filter i and i + k are +-v_i / sqrt(lambda_i + eps) for the top k principal components: out_channels // 2
    of them, or fewer where fewer directions have a variance above eps (grey images copied to 3 channels vary
    in a third of them). Any filters beyond 2k, and the bias, keep their initial values. Returns 2k, the
    number of filters set."""
    conv = first_conv(model)
    cov = patch_covariance(model, conv, images[:SAMPLE_IMAGES])
    lam, vec = torch.linalg.eigh(cov)  # ascending
    lam, vec = lam.flip(0).clamp_min(0), vec.flip(1)
    # an eigenvector's sign is LAPACK's choice: fix it (largest entry positive) so every machine orders +-v alike
    vec = vec * vec.gather(0, vec.abs().argmax(0, keepdim=True)).sign()
    eps = EPS * lam.mean()
    k = min(conv.out_channels // 2, int((lam > eps).sum()))  # directions the images actually vary in
    filters = (vec[:, :k] / (lam[:k] + eps).sqrt()).T  # (k, D): unit variance on the sample
    filters = filters.reshape(k, *conv.weight.shape[1:]).to(conv.weight.device, conv.weight.dtype)
    conv.weight[:k] = filters
    conv.weight[k : 2 * k] = -filters
    return 2 * k
