#!/usr/bin/env bash
# A whole reproduction in one short GPU session, on real CIFAR-100 carried to the machine:
#   1. the ResNet-50 teacher trained with cross-entropy (and its projection head probed),
#   2. one `paper` LW-SupCRD ResNet-18 student and one cross-entropy student on it,
#   3. a table of every run: last-epoch test accuracy, best epoch apart, seconds per epoch.
# Sized (an estimate from earlier H100 figures) for about 5-10 minutes with the 150-per-class subset.
#
# The data, an npz folder, is either a subset carried in the checkout
#     python desupcon.py data subset npz:../shared/data/cifar100 carry/cifar100-150 \
#         --train-per-class 150 --test-per-class 50          # 53.6 MiB
# or the full set carried in parts over consecutive calls to a warm machine:
#     python desupcon.py data split npz:../shared/data/cifar100 /tmp/parts --parts 4   # 4 x 40 MiB
# Put one part in carry/ per call; with PARTS set, each call first moves the parts found in carry/
# into PARTS (an ignored folder, which stays on a warm machine); ONLY_CARRY=1 stops there. The call
# that brings the last part joins them into DATA (checked against the source's digest) and runs.
#
# Settings (environment): DATA, PARTS, CARRY, ONLY_CARRY, OUT, DEVICE, TEACHER_EPOCHS, EPOCHS, PY,
# and EXTRA (more flags for every command, e.g. "--teacher-arch resnet8 --student-arch resnet8").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python
DATA=${DATA:-carry/cifar100-150}
PARTS=${PARTS:-}
CARRY=${CARRY:-carry}
ONLY_CARRY=${ONLY_CARRY:-}
OUT=${OUT:-runs/gpu_reproduce}
DEVICE=${DEVICE:-cuda}
TEACHER_EPOCHS=${TEACHER_EPOCHS:-30}
EPOCHS=${EPOCHS:-30}
EXTRA=${EXTRA:-}

"$PY" -c "import torch; print('torch', torch.__version__, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')"
if [ -n "$PARTS" ]; then
    mkdir -p "$PARTS"
    for part in "$CARRY"/part-*-of-*; do
        [ -d "$part" ] || continue
        rm -rf "${PARTS:?}/$(basename "$part")"
        mv "$part" "$PARTS/" && echo "kept $(basename "$part") in $PARTS"
    done
    if [ -n "$ONLY_CARRY" ]; then
        ls "$PARTS"
        exit 0
    fi
fi
if [ -n "$PARTS" ] && [ ! -f "$DATA/train.npz" ]; then
    "$PY" desupcon.py data join "$DATA" "$PARTS"
fi
[ -f "$DATA/train.npz" ] || { echo "gpu_reproduce: no dataset at $DATA (set DATA, or PARTS to join)" >&2; exit 2; }

# shellcheck disable=SC2086  # EXTRA is a list of flags
common=(--preset paper --dataset "npz:$DATA" --train-teacher --teacher-epochs "$TEACHER_EPOCHS"
        --device "$DEVICE" --output-dir "$OUT" $EXTRA)
started=$(date +%s)
"$PY" desupcon.py teacher "${common[@]}"
for method in lw-supcrd ce; do
    "$PY" desupcon.py train "${common[@]}" --method "$method" --epochs "$EPOCHS"
done
train_images=$("$PY" -c "import numpy as np, sys; print(len(np.load(sys.argv[1])['labels']))" "$DATA/train.npz")
"$PY" scripts/summarise_logs.py "$OUT" --train-images "$train_images"
echo "data $DATA ($train_images training images), teacher $TEACHER_EPOCHS epochs, students $EPOCHS epochs: $(( $(date +%s) - started )) s in all"
