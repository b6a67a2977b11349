"""Cheaper designs for the fast recipe, judged on a validation split (issue 24's time-to-99 goal).

The fast recipe's network (``fast-cnn-deep``) computes its first convolution and a 2 x 2 max-pool at 14 x 14,
on maps 4x the size of its later ones. Each candidate below makes that layer cheaper. Every one trains with the fast
recipe's settings as they are now (one epoch, batch 256, Adam 0.02 one-cycle, label smoothing 0.05, the
whitening start of the first layer, Adam's betas 0.8 and 0.99 and the first 70 % of the epoch's batches, the first
layer frozen after half the steps, the precision `auto` picks). A figure measured before a setting joined the
recipe reruns with its old value in --set: `adam_beta1=0.9,adam_beta2=0.999,epoch_fraction=0.9` before the
twenty-fourth session of 2026-12-07, `stem_fraction=1` before the twenty-third, `epoch_fraction=1` before the
sixth of 2026-12-05, `whiten_init=false` before the fifth, `label_smoothing=0` before the fourth; each earlier
figure needs every later old value too, e.g. `--set
label_smoothing=0,whiten_init=false,epoch_fraction=1,stem_fraction=1,adam_beta1=0.9,adam_beta2=0.999`) on the first
60,000 - --val-size training images and is scored on the other --val-size, so the test set chooses nothing;
its test accuracy is not printed. One JSON line per candidate: validation accuracy over the seeds (mean, min,
max, standard deviation, and each seed's, in --seeds order, for paired comparisons) and the training loop's
seconds.

    .venv/bin/python benchmarks/fast_variants.py --seeds 0 1 2 3 4

Candidates (the name's layers after the pixel-unshuffle to 14 x 14 with 4 channels):
  fast-cnn-deep     the recipe's: [24] 3x3 + pool to 7x7, [32], [48] + pool to 3x3
  narrow-16         the same with 16 channels in the first layer
  strided           the first layer a 3x3 convolution of stride 2 (14x14 -> 7x7, no pool): [32] s2, [32], [48] + pool
  strided-wide      the same at 48 channels throughout
  late-pool         the recipe's widths with the second pool moved up: [24] pool, [32] pool to 3x3, [48] at 3x3
  slim-late         [16] pool, [32] pool to 3x3, [48] at 3x3
  fast-cnn-centre   the package's model: fast-cnn-deep on the centre 24 x 24 of each image (12 x 12 after
                    the unshuffle)
  centre-narrow-16  narrow-16 on the centre 24 x 24: the package's fast-cnn-centre-16, the fast recipe's
                    network since the fourth session of 2026-12-05 (with label smoothing 0.05)
  centre-16-last-40  centre-narrow-16 with its last convolution at 40 channels: [16] pool, [32], [40] + pool
  centre-narrow-12  the centre model with 12 channels in the first layer
  centre-patch4     the centre 24 x 24 unshuffled 4 x 4 to 6 x 6 x 16, no pool there: [24], [32], [48] + pool
  centre-patch4-wide  the same with [32], [32], [48]
  centre-strided    the centre model with a stride-2 first layer in place of its convolution + pool
  frozen-stem       centre-narrow-16 with its first block (convolution and batch norm) frozen after the
                    whitening start: no gradient for it, and none into it (the second layer's backward
                    skips its input's gradient)
  frozen-stem-after-40, -106  the same, frozen after the first 40 or 106 of the 177 steps that the recipe's
                    epoch fraction of 0.9 left of a 50,000-image epoch (138 at today's 0.7; the recipe's
                    `stem_fraction` 0.5 now freezes every candidate's stem after 69 of them: run these with
                    --set stem_fraction=1,epoch_fraction=0.9,adam_beta1=0.9,adam_beta2=0.999)
  frozen-second-after-106, -118, -133, -155  the recipe (its stem frozen after half the steps) with the second
                    block frozen too, after 106 (0.6), 118 (two thirds), 133 (three quarters) or 155 of the 177
                    steps of a 50,000-image epoch at 0.9 (the twenty-third session's figures: run these with
                    --set epoch_fraction=0.9,adam_beta1=0.9,adam_beta2=0.999)
  g2-last           centre-narrow-16 with its last convolution in 2 groups: [16] pool, [32], [48 in 2 groups] + pool
  g2-last-64        the same at 64 channels (the grouped layer's FLOP those of a full [32] -> [32])
  sep-last          the last convolution depthwise-separable: 3x3 on each of 32 channels, then 1x1 to 48
  sep-last-64       the same, 1x1 to 64

Each line also gives the candidate's training FLOP per image (forward and backward of its convolutions and
matrix products, counted by torch's FlopCounterMode), a cost that does not drift with the VM as seconds do.
A first line gives the share of the training images' ink in the border fast-cnn-centre drops.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from mnist_classifier.config import TrainConfig, parse_overrides
from mnist_classifier.data import load_dataset
from mnist_classifier.device import select_device
from mnist_classifier.experiments import run_seeds
from mnist_classifier.models import ModelConfig, build_model, registry
from mnist_classifier.models.cnn import ConvBN, FastCNN, FastCNNCentre, FastCNNCentre16, conv_bn
from mnist_classifier.models.pooling import MaxPool2x2


def conv_bn_s2(c_in: int, c_out: int) -> nn.Sequential:
    """3x3 convolution of stride 2 (halves H and W in place of a pool), batch norm, ReLU."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out),
                         nn.ReLU(inplace=True))


def widths(name: str, base: type[nn.Module], first: int, last: int = 48) -> type[nn.Module]:
    """``base`` with its convolutions after the unshuffle at [first] + pool, [32], [last] + pool to 3 x 3, and
    a head that reads ``last`` channels; ``name`` is the class's name in the model's printout."""

    class Widths(base):
        def __init__(self, cfg) -> None:
            super().__init__(cfg)
            if last != 48:  # base built its head for 48 channels
                self.head[-1] = nn.Linear(last * 3 * 3, cfg.num_classes)

        @staticmethod
        def blocks(c_in: int) -> list[nn.Module]:
            return [conv_bn(c_in, first, pool=True), conv_bn(first, 32), conv_bn(32, last, pool=True)]

    Widths.__name__ = Widths.__qualname__ = name
    return Widths


Narrow16 = widths("Narrow16", FastCNN, 16)


class Strided(FastCNN):
    @staticmethod
    def blocks(c_in: int) -> list[nn.Module]:
        return [conv_bn_s2(c_in, 32), conv_bn(32, 32), conv_bn(32, 48, pool=True)]


class StridedWide(FastCNN):
    @staticmethod
    def blocks(c_in: int) -> list[nn.Module]:
        return [conv_bn_s2(c_in, 48), conv_bn(48, 48), conv_bn(48, 48, pool=True)]


class LatePool(FastCNN):
    @staticmethod
    def blocks(c_in: int) -> list[nn.Module]:
        return [conv_bn(c_in, 24, pool=True), conv_bn(24, 32, pool=True), conv_bn(32, 48)]  # 7x7, 3x3, 3x3


class SlimLate(FastCNN):
    @staticmethod
    def blocks(c_in: int) -> list[nn.Module]:
        return [conv_bn(c_in, 16, pool=True), conv_bn(16, 32, pool=True), conv_bn(32, 48)]  # 7x7, 3x3, 3x3


CentreNarrow20 = widths("CentreNarrow20", FastCNNCentre, 20)
Centre40 = widths("Centre40", FastCNNCentre, 24, last=40)  # the last convolution: 57 % of the centre model's FLOP
Centre16Last40 = widths("Centre16Last40", FastCNNCentre, 16, last=40)  # the fast recipe's first layer, centre-40's last
CentreNarrow12 = widths("CentreNarrow12", FastCNNCentre, 12)


class CentrePatch4(FastCNNCentre):
    """No pool at 12 x 12: a 4 x 4 pixel-unshuffle (24 x 24 -> 6 x 6 x 16), then [24], [32], [48] + pool to 3 x 3.
    The same FLOP; the first convolution (4 input channels, the least efficient per FLOP) and its pool go."""

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.features = nn.Sequential(nn.PixelUnshuffle(4), conv_bn(16 * cfg.in_channels, 24), conv_bn(24, 32),
                                      conv_bn(32, 48, pool=True))


class CentrePatch4Wide(CentrePatch4):
    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.features[1], self.features[2] = conv_bn(16 * cfg.in_channels, 32), conv_bn(32, 32)


class CentreStrided(FastCNNCentre):
    @staticmethod
    def blocks(c_in: int) -> list[nn.Module]:
        return [conv_bn_s2(c_in, 24), conv_bn(24, 32), conv_bn(32, 48, pool=True)]


class FrozenStem(FastCNNCentre16):
    """centre-narrow-16 whose first block (after the unshuffle) stops training after ``AFTER`` training steps
    (0: never trains; the whitening start, which runs before training, still sets it)."""

    AFTER = 0

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.steps_seen = 0
        if self.AFTER == 0:
            self._freeze()
        else:
            self.register_forward_pre_hook(FrozenStem._count)

    def _freeze(self) -> None:
        for p in self.features[1].parameters():
            p.requires_grad_(False)  # set_to_none zeroing leaves their .grad None: Adam skips them

    @staticmethod
    def _count(model, _args) -> None:
        if model.training and torch.is_grad_enabled():
            model.steps_seen += 1
            if model.steps_seen == model.AFTER + 1:  # before the forward of step AFTER + 1
                model._freeze()


def frozen_after(steps: int) -> type[nn.Module]:
    """FrozenStem, frozen after ``steps`` training steps."""
    return type(f"FrozenStemAfter{steps}", (FrozenStem,), {"AFTER": steps})


class FrozenSecond(FrozenStem):
    """centre-narrow-16 whose second block stops training after ``AFTER`` steps (the stem follows the recipe's
    ``stem_fraction``): a further layer frozen late, as FreezeOut does (Brock et al., 2017)."""

    AFTER = 133

    def _freeze(self) -> None:
        for p in self.features[2].parameters():
            p.requires_grad_(False)


def second_frozen_after(steps: int) -> type[nn.Module]:
    """FrozenSecond, its second block frozen after ``steps`` training steps."""
    return type(f"FrozenSecondAfter{steps}", (FrozenSecond,), {"AFTER": steps})


def last_layer(name: str, last: Callable[[], nn.Module], width: int) -> type[nn.Module]:
    """centre-narrow-16 with ``last()`` (which pools to 3 x 3 and ends in ``width`` channels) as its last block."""

    class Last(FastCNNCentre16):
        def __init__(self, cfg) -> None:
            super().__init__(cfg)
            self.features[-1] = last()
            self.head[-1] = nn.Linear(width * 3 * 3, cfg.num_classes)

    Last.__name__ = Last.__qualname__ = name
    return Last


def pooled_block(conv: nn.Module, c_out: int) -> ConvBN:
    """``conv``, the 2 x 2 max-pool, batch norm and ReLU, as conv_bn's block (torch's layers behind the pool)."""
    return ConvBN(conv, MaxPool2x2(), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


def grouped(c_out: int) -> Callable[[], ConvBN]:
    return lambda: pooled_block(nn.Conv2d(32, c_out, 3, padding=1, bias=False, groups=2), c_out)


def separable(c_out: int) -> Callable[[], ConvBN]:
    return lambda: pooled_block(nn.Sequential(nn.Conv2d(32, 32, 3, padding=1, bias=False, groups=32),
                                              nn.Conv2d(32, c_out, 1, bias=False)), c_out)


CANDIDATES = {"narrow-16": Narrow16, "strided": Strided, "strided-wide": StridedWide, "late-pool": LatePool,
              "slim-late": SlimLate,
              "centre-narrow-16": FastCNNCentre16, "centre-narrow-20": CentreNarrow20, "centre-40": Centre40,
              "centre-16-last-40": Centre16Last40, "centre-narrow-12": CentreNarrow12,
              "centre-patch4": CentrePatch4, "centre-patch4-wide": CentrePatch4Wide, "centre-strided": CentreStrided,
              "frozen-stem": FrozenStem, "frozen-stem-after-40": frozen_after(40),
              "frozen-stem-after-106": frozen_after(106),
              **{f"frozen-second-after-{n}": second_frozen_after(n) for n in (106, 118, 133, 155)},
              "g2-last": last_layer("G2Last", grouped(48), 48), "g2-last-64": last_layer("G2Last64", grouped(64), 64),
              "sep-last": last_layer("SepLast", separable(48), 48),
              "sep-last-64": last_layer("SepLast64", separable(64), 64)}


def train_mflop_per_image(name: str) -> float:
    """Forward and backward FLOP of one training image through ``name`` (batch 2, fp32), in millions."""
    model = build_model(ModelConfig(name=name))
    x = torch.randn(2, 1, 28, 28)
    with FlopCounterMode(display=False) as counter:
        model(x).sum().backward()
    return counter.get_total_flops() / 2 / 1e6


def border_ink_percent(images: torch.Tensor, border: int = FastCNNCentre.BORDER) -> float:
    """The share of all training pixels' intensity (uint8 ``(N, C, H, W)``) in the ``border`` pixels that
    fast-cnn-centre drops, in percent."""
    total = images.sum(dtype=torch.float64)
    centre = images[..., border:-border, border:-border].sum(dtype=torch.float64)
    return round(float(100 * (1 - centre / total)), 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--val-size", type=int, default=10_000)
    parser.add_argument("--candidates", nargs="+", default=["fast-cnn-deep", "fast-cnn-centre", *CANDIDATES])
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--set", default="", metavar="KEY=VALUE,...",
                        help="other overrides of the recipe, e.g. lr=0.03")
    args = parser.parse_args()
    registry.MODELS.update(CANDIDATES)  # this process only: the candidates are not part of the package
    device = select_device("auto")
    splits = load_dataset(args.dataset, args.data_dir)
    print(json.dumps({"dataset": args.dataset, "border_ink_percent": border_ink_percent(splits.train_images)}), flush=True)
    for name in args.candidates:
        cfg = TrainConfig.from_recipe("fast", model=name, dataset=args.dataset, val_size=args.val_size, device=str(device),
                                      data_dir=args.data_dir, log_every=10**9, **parse_overrides(TrainConfig, args.set))
        with tempfile.TemporaryDirectory() as out:
            runs = run_seeds(cfg, args.seeds, splits, device, out).summaries
        val = [r["val_accuracy"] for r in runs]
        secs = [r["train_seconds"] for r in runs]
        print(json.dumps({"candidate": name, "dataset": args.dataset, "set": args.set, "seeds": args.seeds, "val_images": args.val_size,
                          "val_accuracy_mean": round(statistics.mean(val), 3), "val_min": min(val), "val_max": max(val),
                          "val_sd": round(statistics.stdev(val), 3) if len(val) > 1 else None, "val_per_seed": val,
                          "train_seconds_mean": round(statistics.mean(secs), 2),
                          "train_mflop_per_image": round(train_mflop_per_image(name), 2), "precision": runs[0]["precision"]}),
              flush=True)


if __name__ == "__main__":
    main()
