#!/usr/bin/env bash
# LRS2 recipe: the paper's Matryoshka AVSR experiments (arXiv 2503.06362, Table 1; see README.md).
#   LRS2_ROOT=/data/LRS2 [LANDMARKS=/data/LRS2_landmarks] bash run.sh [--stage N] [--stop-stage M]
#       [--conf conf/avsr_ms.yaml] [--baselines true] [--snrs "5 0 -5"]
# LRS2_ROOT holds mvlrs_v1/ and train.txt val.txt test.txt pretrain.txt. Stages: see ../lrs_run.sh.
cd "$(dirname "$0")" && exec bash ../lrs_run.sh lrs2 "${LRS2_ROOT:-}" "$@"
