#!/usr/bin/env bash
# Reproduce the README's Spartan table: plain SGD against Spartan training with each mutation, on
# Fashion-MNIST, small CNN, the same 2-epoch budget (a mutation round after each epoch), seeds 0 1 2.
# Spartan's SGD sees 90% of the training set; the other 10% is its evolution split. ~12 min on 2 cores.
set -euo pipefail
OUT=${OUT:-runs/spartan}
FF=${FASTFLAT:-fastflat}
# The recipe these tables were made with, the defaults before fastcnn (later options win, e.g. sse's --lr 0.1)
CNN=(--model cnn --lr 0.05 --no-nesterov)
for seed in 0 1 2; do
  $FF train "${CNN[@]}" --method sgd --epochs 2 --seed $seed --out $OUT --name sgd-s$seed
  $FF train "${CNN[@]}" --method spartan --mutation es --epochs 2 --seed $seed --out $OUT --name es-s$seed
  $FF train "${CNN[@]}" --method spartan --mutation grad --epochs 2 --seed $seed --out $OUT --name grad-s$seed
done
python3 "$(dirname "$0")/spartan_table.py" $OUT
