#!/usr/bin/env bash
# Reproduce the README's SWA table (and the 4-epoch snapshot-ensemble / FGE runs, where neither ensemble
# beat its best member; reproduce_ensembles.sh has the 12-epoch ones): Fashion-MNIST, small CNN, the
# same 4-epoch budget, seeds 0 1 2. Writes runs under $OUT and prints the table.
# About 12 epochs per seed: ~30-40 min on 2 CPU cores.
set -euo pipefail
OUT=${OUT:-runs/averaging}
FF=${FASTFLAT:-fastflat}
# The recipe these tables were made with, the defaults before fastcnn (later options win, e.g. sse's --lr 0.1)
CNN=(--model cnn --lr 0.05 --no-nesterov)
for seed in 0 1 2; do
  # average every quarter epoch (c = 117 of 468 iterations): 8 models over the last 2 epochs
  $FF train "${CNN[@]}" --method swa --epochs 4 --swa-start 2 --swa-lr 0.01 --swa-cycle 117 --seed $seed --out $OUT --name swa-s$seed
  $FF train "${CNN[@]}" --method sse --epochs 4 --sse-cycles 2 --lr 0.1 --seed $seed --out $OUT --name sse-s$seed
  $FF train "${CNN[@]}" --method fge --epochs 4 --fge-pretrain 0.25 --fge-cycle-epochs 2 --seed $seed --out $OUT --name fge-s$seed
done
python3 "$(dirname "$0")/averaging_table.py" $OUT
