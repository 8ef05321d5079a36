#!/usr/bin/env bash
# The shipped tiny-shapes checkpoint's recipe: five stages of `python -m streamchat.train`, each from
# the last one's weights (--init), as they ran on one NVIDIA H200 (16 cores) on 2026-12-02, 37 minutes
# of training in all (docs/tiny-shapes.md, "Stages"). Every batch is drawn from (seed, batch index),
# so a rerun sees the same clips; the stages stop on --minutes, so another machine reaches other step
# counts (the H200's: 3,740, 2,386, 1,593, 768 and 661).
#
#   bash scripts/train_tiny_shapes.sh DIR     # writes DIR/stage1 to DIR/stage4 and DIR/tiny-shapes
#
# Stage 1 shared the GPU with a second run (7 batch workers each); the later stages ran alone.
set -euo pipefail
DIR=${1:?usage: $0 DIR}
PY=${PY:-python3}
# 1. plain 2 s clips, shapes still, the word on screen throughout; word, colour and shape questions
"$PY" -m streamchat.train --out "$DIR/stage1" --first 1.0 --steps 6000 --minutes 7.3 --workers 7 --eval-batches 4 --report 200
# 2. a quarter more of stage 1, then every kind, the longest clip growing from 2 to 24 s
"$PY" -m streamchat.train --init "$DIR/stage1" --out "$DIR/stage2" --steps 3600 --minutes 8 --workers 15 \
    --first 0.25 --ramp 0.3 --warmup 100 --lr 4e-4 --eval-batches 16 --report 200
# 3. every kind on 2 to 24 s clips at a lower rate, 12 clips x 8 questions a step (clips cost the CPU time)
"$PY" -m streamchat.train --init "$DIR/stage2" --out "$DIR/stage3" --steps 2600 --minutes 7.8 --workers 15 \
    --first 0 --ramp 0 --warmup 50 --lr 2e-4 --clips 12 --questions 8 --eval-batches 16 --report 200
# 4 and 5. long streams: every kind on clips of 2 to 96 s, 12 clips x 12 questions packed over one pass
# of each clip's video, lr 1e-4 (the needle at 96 s and every kind rose; the second pass rose again)
"$PY" -m streamchat.train --init "$DIR/stage3" --out "$DIR/stage4" --seconds 2,96 --first 0 --ramp 0 --clips 12 \
    --questions 12 --lr 1e-4 --warmup 50 --steps 3000 --minutes 7.4 --workers 15 --eval-batches 16 --report 100
"$PY" -m streamchat.train --init "$DIR/stage4" --out "$DIR/tiny-shapes" --seconds 2,96 --first 0 --ramp 0 --clips 12 \
    --questions 12 --lr 1e-4 --warmup 50 --steps 3000 --minutes 7.0 --workers 15 --eval-batches 16 --report 100
