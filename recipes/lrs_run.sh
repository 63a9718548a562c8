#!/usr/bin/env bash
# Shared by recipes/lrs3/run.sh and recipes/lrs2/run.sh (run from the recipe dir):
#   bash ../lrs_run.sh <lrs3|lrs2> <corpus root> [--stage N] [--stop-stage M] [--conf FILE]
#       [--baselines true] [--snrs "5 0 -5"]
# Stages (each skips work already done; rerun to resume):
#   0 prepare <corpus>     corpus/<corpus>/ (aligned 96x96 mouth ROIs), data/<split>/manifest.jsonl
#   1 extract-features     dump/<encoders>/{train-aug<hash>,val,test}/ (frozen Whisper + AV-HuBERT, once)
#   2 train --rates all    exp/<conf>_all/ (one Matryoshka model); with --baselines, one model per pair
#   3 decode --sweep       every trained pair, beam 15; then babble noise at each SNR of --snrs (not VSR)
#   4 score                exp/*/RESULTS.md
# Environment: LANDMARKS (landmark pickle dir), NJ (prepare workers), TRAIN (e.g.
#   "torchrun --nproc_per_node 8 -m mavsr_cli" for multi-GPU training).
set -euo pipefail

stage=0
stop_stage=100
conf=conf/avsr_ms.yaml
baselines=false
snrs=""
corpus=$1
root=$2
shift 2
while [ $# -gt 0 ]; do
  case "$1" in
    --stage) stage=$2; shift 2 ;;
    --stop-stage) stop_stage=$2; shift 2 ;;
    --conf) conf=$2; shift 2 ;;
    --baselines) baselines=$2; shift 2 ;;
    --snrs) snrs=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
landmarks=${LANDMARKS:-}
train_cmd=${TRAIN:-mavsr}
name=$(basename "$conf" .yaml)
step() { [ "$stage" -le "$1" ] && [ "$stop_stage" -ge "$1" ]; }
SECONDS=0

if step 0; then
  [ -n "$root" ] || { echo "set ${corpus^^}_ROOT to the $corpus tree (see README.md)" >&2; exit 2; }
  echo "== stage 0: prepare $corpus from $root"
  mavsr prepare "$corpus" --root "$root" ${landmarks:+--landmarks "$landmarks"} --nj "${NJ:-8}"
fi
if step 1; then
  echo "== stage 1: extract features [${SECONDS}s]"
  mavsr extract-features --config "$conf"   # every prepared split: train, val, test
fi
if step 2; then
  echo "== stage 2: Matryoshka training [${SECONDS}s]"
  $train_cmd train --config "$conf" --rates all --tag "${name}_all"
  if [ "$baselines" = true ]; then
    for pair in $(mavsr info --grid "$conf"); do   # one separate model per configuration
      $train_cmd train --config "$conf" --rates "$pair" --tag "${name}_${pair}"
    done
  fi
fi
if step 3; then
  echo "== stage 3: decode [${SECONDS}s]"
  for exp in exp/${name}_*; do
    [ -f "$exp/meta.json" ] || continue
    mavsr decode --exp "$exp" --split test --sweep --beam 15
    grep -q '"modality": "v"' "$exp/meta.json" && continue  # video only: no audio to add noise to
    for snr in $snrs; do
      mavsr decode --exp "$exp" --split test --sweep --beam 15 --snr "$snr" --noise babble
    done
  done
fi
if step 4; then
  echo "== stage 4: score [${SECONDS}s]"
  for exp in exp/${name}_*; do
    [ -f "$exp/meta.json" ] || continue
    mavsr score --exp "$exp"
  done
fi
echo "== done in ${SECONDS}s"
