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

from mnist_classifier import checkpoint
from mnist_classifier.datasets import load_for
from mnist_classifier.device import autocast_dtype, select_device
from mnist_classifier.evaluate import ensemble_log_probs, metrics_from_logits, predict_log_probs
from mnist_classifier.preprocess import model_input


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--group", nargs="+", action="append", required=True, metavar=("NAME", "CHECKPOINT"),
                        help="a name, then the checkpoints of one ensemble (repeatable)")
    parser.add_argument("--tta-shift", type=int, default=1, help="pixel radius of the shifted views (default: 1, 9 views)")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto")
    args = parser.parse_args()

    device = select_device(args.device)
    amp_dtype = autocast_dtype(args.precision, device)
    splits, labels = None, None
    cache: dict[str, dict[str, torch.Tensor]] = {}  # path -> {"plain": log-probs, "tta": log-probs}
    for name, *paths in args.group:
        if not paths:
            parser.error(f"group {name} names no checkpoint")
        for path in paths:
            if path in cache:
                continue
            model, info, _ = checkpoint.load_model(path, device)
            if splits is None:
                splits = load_for(info, args.data_dir)
                labels = splits.test_labels.to(device)
            to_input = lambda v, m=info: model_input(v, m.mean, m.std, device)  # noqa: E731
            cache[path] = {
                "plain": predict_log_probs(model, splits.test_images, to_input, 0, amp_dtype=amp_dtype),
                "tta": predict_log_probs(model, splits.test_images, to_input, args.tta_shift, amp_dtype=amp_dtype),
            }
        row = {"group": name, "members": len(paths), "tta_views": (2 * args.tta_shift + 1) ** 2}
        for kind in ("plain", "tta"):
            member_acc = [metrics_from_logits(cache[p][kind], labels)["accuracy"] for p in paths]
            ens = ensemble_log_probs([cache[p][kind] for p in paths])
            m = metrics_from_logits(ens, labels)
            row[kind] = {
                "ensemble_accuracy": m["accuracy"],
                "ensemble_errors": m["n"] - m["correct"],
                "member_accuracy": member_acc,
                "member_mean": sum(member_acc) / len(member_acc),
                "wrong_indices": ens.argmax(1).ne(labels).nonzero().flatten().tolist(),
            }
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
