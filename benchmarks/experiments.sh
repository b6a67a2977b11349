#!/usr/bin/env bash
# The guide's "Experiments to Try", each run as one `mnist sweep` of the guide's CNN (3 seeds, a 5,000-image
# validation split held out of the training set, the test set only reported). EXPERIMENTS.md quotes the results
# and `mnist compare` draws them. Run from the repository root; about an hour of CPU on 2 cores for the six,
# and as much again for lrfind and pruning (not run by default). betas (not run by default either, under a minute)
# sweeps Adam's betas for the fast recipe instead of the guide's CNN.
#   benchmarks/experiments.sh            all of them
#   benchmarks/experiments.sh batch lr   some of them
set -euo pipefail
MNIST=${MNIST:-.venv/bin/mnist}
OUT=${OUT:-sweeps}
common=(--sampler grid --pruner none --seeds 3 --device cpu)

run() {  # NAME ARGS...: one sweep into $OUT/NAME, resumed if it was interrupted
  local name=$1; shift
  local resume=(); [ -f "$OUT/$name/sweep.json" ] && resume=(--resume)
  "$MNIST" sweep --out "$OUT/$name" "${common[@]}" "$@" "${resume[@]}" --json > "$OUT/$name.json"
}

mkdir -p "$OUT"
for exp in "${@:-batch depth lr optimizer dropout}"; do
  for e in $exp; do
    case $e in
      batch)     run exp-batch --param batch_size=32,64,128 ;;
      depth)     run exp-depth --param model=guide-cnn,guide-cnn-deep ;;
      lr)        run exp-lr --epochs 3 --param lr=0.0001,0.0003,0.001,0.003,0.01 ;;
      optimizer) run exp-opt-sgd --epochs 3 --optimizer sgd --param lr=0.01,0.03,0.1
                 run exp-opt-rmsprop --epochs 3 --optimizer rmsprop --param lr=0.0001,0.0003,0.001 ;;
      dropout)   run exp-dropout --epochs 10 --param dropout=0,0.25,0.5 ;;  # dropout 0 is also the epochs curve
      lrfind)    # lr-find's suggestion for the guide's CNN, trained like exp-batch's lr 0.001 (batch 64)
                 "$MNIST" lr-find --device cpu --plot "$OUT/lr-find.png" --json > "$OUT/lr-find.json"
                 lr=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['suggested_lr'])" "$OUT/lr-find.json")
                 run exp-lrfind --lr "$lr" ;;
      pruning)   # BENCHMARKS.md: the same 24-point grid (3 epochs, 1 seed) without and with the median pruner
                 grid=(--epochs 3 --seeds 1 --param lr=0.0001,0.0002,0.0005,0.001,0.002,0.005,0.01,0.02
                       --param batch_size=32,64,128)
                 run exp-prune-none "${grid[@]}" --pruner none
                 run exp-prune-median "${grid[@]}" --pruner median ;;
      betas)     run exp-betas-fast --recipe fast --param adam_beta1=0.8,0.9 --param adam_beta2=0.99,0.999 ;;
      *) echo "unknown experiment $e" >&2; exit 2 ;;
    esac
  done
done
