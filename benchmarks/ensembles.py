"""Test accuracy of named ensembles, each with and without shift test-time augmentation, in one run.

Every checkpoint is evaluated once (plain and with TTA) and reused by every group that names it, so
overlapping groups cost nothing extra. Members and groups are given on the command line, never picked
from the results. Prints one JSON line per group: each member's accuracy, the ensemble's (mean of
probabilities), and the test indices the ensemble gets wrong.

    .venv/bin/python benchmarks/ensembles.py --tta-shift 1 \\
        --group res10 runs/gpu-res/res-seed*.pt --group bn5 runs/gpu-ensemble/ensemble/seed*/model.pt
"""

import argparse
import json

import torch

from mnist_classifier.data import load_for
from mnist_classifier.device import autocast_dtype, select_device
from mnist_classifier.evaluation import checkpoint_scores, combine
from mnist_classifier.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--group", nargs="+", action="append", required=True, metavar=("NAME", "CHECKPOINT"),
                        help="a name, then the checkpoints of one ensemble (repeatable)")
    parser.add_argument("--tta-shift", type=int, default=1, help="pixel radius of the shifted views (default: 1, 9 views)")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="fp32")
    args = parser.parse_args()

    device = select_device(args.device)
    amp_dtype = autocast_dtype(args.precision, device)
    splits = None
    cache: dict[str, dict[str, torch.Tensor]] = {}  # path -> {"plain": scores, "tta": log-probs}
    for name, *paths in args.group:
        if not paths:
            parser.error(f"group {name} names no checkpoint")
        for path in paths:
            if path in cache:
                continue
            model, info, _ = load_model(path, device)
            splits = splits or load_for(info, args.data_dir)
            cache[path] = {kind: checkpoint_scores(model, info, splits.test_images, device, shift, amp_dtype=amp_dtype)
                           for kind, shift in (("plain", 0), ("tta", args.tta_shift))}
        row = {"group": name, "members": len(paths), "tta_views": (2 * args.tta_shift + 1) ** 2}
        for kind in ("plain", "tta"):
            result = combine([cache[p][kind] for p in paths], splits.test_labels, splits.info.class_names, paths)
            member_acc = [m.accuracy for m in result.members]
            row[kind] = {
                "ensemble_accuracy": result.accuracy,
                "ensemble_errors": result.n - result.correct,
                "member_accuracy": member_acc,
                "member_mean": sum(member_acc) / len(member_acc),
                "wrong_indices": result.wrong_indices(splits.test_labels),
            }
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
