#!/usr/bin/env bash
# Everything measured on a GPU, as one prepared run (the `device` tool lends an H200 for 15 minutes in all).
#
#   1. benchmarks/device_speed.py: time to 99 % test accuracy (fast recipe) and the seed recipe's 5 epochs,
#      with bf16 autocast and in fp32, alone on the GPU;
#   2. the CLI on cuda: `mnist train --device cuda`, then that checkpoint evaluated on cuda and on the CPU;
#   3. ensemble members: the best recipe with $ENSEMBLE_EPOCHS epochs, one process per seed, in parallel,
#      stopped at the deadline; their model.pt files come back in ensemble.tar.gz for `mnist evaluate`.
#
# Usage (repo root; MNIST .gz files in $1, since the machine has no internet):
#   OUT=/tmp/gpu bash benchmarks/gpu_session.sh .gpudata
# Knobs: DEVICE (cuda), PYTHON (python3), REPEATS (3), SPEED_SET (overrides for every speed run, e.g.
# cuda_graphs=true), CLI_FLAGS (extra `mnist train` flags), ENSEMBLE_EPOCHS (50, or "auto": as many as the
# budget allows, from a one-epoch probe), ENSEMBLE_SEEDS ("0 1 2 3 4"),
# ENSEMBLE_SET (overrides for the members, e.g. model=res-cnn), BUDGET (seconds for the whole script, 520),
# PARTS (which of the three parts to run, "1 2 3"; e.g. PARTS=3 spends the whole budget on members).
set -u
SRC=${1:-.gpudata}
OUT=${OUT:-/tmp/gpu-out}
DEVICE=${DEVICE:-cuda}
PY=${PYTHON:-python3}
REPEATS=${REPEATS:-3}
EPOCHS=${ENSEMBLE_EPOCHS:-50}
SEEDS=${ENSEMBLE_SEEDS:-"0 1 2 3 4"}
BUDGET=${BUDGET:-520}
SPEED_SET=${SPEED_SET:-}
CLI_FLAGS=${CLI_FLAGS:-}
ENSEMBLE_SET=${ENSEMBLE_SET:-}
PARTS=${PARTS:-"1 2 3"}
WORK=$(mktemp -d)
pids=()
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$OUT" data/MNIST/raw
exec > >(tee -a "$OUT/log.txt") 2>&1

echo "== environment"
cp -n "$SRC"/*.gz data/MNIST/raw/ 2>/dev/null || true
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null || echo "no nvidia-smi"
"$PY" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.cuda.is_available())"
nproc

if [[ " $PARTS " == *" 1 "* ]]; then
    echo "== 1. speed (t=${SECONDS}s)"
    "$PY" benchmarks/device_speed.py --device "$DEVICE" --repeats "$REPEATS" --set "$SPEED_SET" \
        --fast-variant batch_size=512,lr=0.04 | tee "$OUT/speed.jsonl"
fi

if [[ " $PARTS " == *" 2 "* ]]; then
    echo "== 2. CLI on $DEVICE (t=${SECONDS}s)"
    # shellcheck disable=SC2086 # CLI_FLAGS is a list of flags
    "$PY" -m mnist_classifier train --device "$DEVICE" --epochs 1 --out "$WORK/cli" --log-every 300 $CLI_FLAGS
    "$PY" -m mnist_classifier evaluate --checkpoint "$WORK/cli/model.pt" --device "$DEVICE" --json
    "$PY" -m mnist_classifier evaluate --checkpoint "$WORK/cli/model.pt" --device cpu --json
fi
[[ " $PARTS " == *" 3 "* ]] || { echo "== done (t=${SECONDS}s)"; exit 0; }

if [[ "$EPOCHS" == auto ]]; then
    # As many epochs as the time left allows: one epoch of every member at once (the same contention as the
    # real run) measures the seconds per epoch; 60 s stay for start-up, evaluation and packing.
    echo "== 3a. probe: 1 epoch per member (t=${SECONDS}s)"
    for seed in $SEEDS; do
        timeout 180 "$PY" benchmarks/recipes.py --recipe best --epochs 1 --seeds "$seed" --set "$ENSEMBLE_SET" \
            --device "$DEVICE" --out "$WORK/probe" > "$WORK/probe_$seed.log" 2>&1 &
        pids+=($!)
    done
    wait "${pids[@]}"
    pids=()
    cat "$WORK"/probe_*.log
    per_epoch=$("$PY" -c 'import json, sys; print(max(json.loads(line)["train_seconds"] for f in sys.argv[1:]
        for line in open(f) if line.startswith("{\"recipe\"")))' "$WORK"/probe_*.log) || { echo "probe failed"; exit 1; }
    EPOCHS=$("$PY" -c "print(max(1, int(0.85 * ($BUDGET - $SECONDS - 60) / $per_epoch)))")  # 15 % spare
    echo "probe: ${per_epoch}s per epoch -> $EPOCHS epochs"
fi
left=$((BUDGET - SECONDS))
echo "== 3. ensemble members: best recipe, $EPOCHS epochs, seeds $SEEDS, set '$ENSEMBLE_SET', ${left}s left (t=${SECONDS}s)"
for seed in $SEEDS; do
    timeout "$left" "$PY" benchmarks/recipes.py --recipe best --epochs "$EPOCHS" --seeds "$seed" --set "$ENSEMBLE_SET" \
        --device "$DEVICE" --out "$WORK/ensemble" > "$WORK/member_$seed.log" 2>&1 &
    pids+=($!)
done
wait "${pids[@]}"  # not a bare `wait`: that would also wait for the tee above, forever
cat "$WORK"/member_*.log
mkdir -p "$WORK/ensemble" && cp "$WORK"/member_*.log "$WORK/ensemble/"
# The tool returns files of at most 16 MB (5 res-cnn checkpoints are 49 MB): send the tarball in 15 MB
# pieces; join them with `cat ensemble.tar.gz.* > ensemble.tar.gz`.
tar czf - -C "$WORK" --exclude last.pt ensemble | split -b 15M - "$OUT/ensemble.tar.gz."
echo "== done (t=${SECONDS}s)"
