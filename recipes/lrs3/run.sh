#!/usr/bin/env bash
# LRS3 recipe: the paper's Matryoshka AVSR experiments (arXiv 2503.06362, Table 1; see README.md).
#   LRS3_ROOT=/data/LRS3 [LANDMARKS=/data/LRS3_landmarks] bash run.sh [--stage N] [--stop-stage M]
#       [--conf conf/avsr_ms.yaml] [--baselines true] [--snrs "5 0 -5"]
# LRS3_ROOT holds pretrain/ trainval/ test/. Stages: see ../lrs_run.sh.
cd "$(dirname "$0")" && exec bash ../lrs_run.sh lrs3 "${LRS3_ROOT:-}" "$@"
