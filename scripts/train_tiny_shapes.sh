#!/usr/bin/env bash
# The shipped tiny-shapes checkpoint's recipe: three stages of `python -m streamchat.train`, each from
# the last one's weights (--init), as they ran on one NVIDIA H200 (16 cores) on 2026-12-02, 23 minutes
# of training in all (docs/tiny-shapes.md, "Stages"). Every batch is drawn from (seed, batch index),
# so a rerun sees the same clips; the stages stop on --minutes, so another machine reaches other step
# counts (the H200's: 3,740, 2,386 and 1,593).
#
#   bash scripts/train_tiny_shapes.sh DIR     # writes DIR/stage1, DIR/stage2 and DIR/tiny-shapes
#
# Stage 1 shared the GPU with a second run (7 batch workers each); stages 2 and 3 ran alone.
set -euo pipefail
DIR=${1:?usage: $0 DIR}
PY=${PY:-python3}
# 1. plain 2 s clips, shapes still, the word on screen throughout; word, colour and shape questions
"$PY" -m streamchat.train --out "$DIR/stage1" --first 1.0 --steps 6000 --minutes 7.3 --workers 7 --eval-batches 4 --report 200
# 2. a quarter more of stage 1, then every kind, the longest clip growing from 2 to 24 s
"$PY" -m streamchat.train --init "$DIR/stage1" --out "$DIR/stage2" --steps 3600 --minutes 8 --workers 15 \
    --first 0.25 --ramp 0.3 --warmup 100 --lr 4e-4 --eval-batches 16 --report 200
# 3. every kind on 2 to 24 s clips at a lower rate, 12 clips x 8 questions a step (clips cost the CPU time)
"$PY" -m streamchat.train --init "$DIR/stage2" --out "$DIR/tiny-shapes" --steps 2600 --minutes 7.8 --workers 15 \
    --first 0 --ramp 0 --warmup 50 --lr 2e-4 --clips 12 --questions 8 --eval-batches 16 --report 200
