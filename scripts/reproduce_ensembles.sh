#!/usr/bin/env bash
# Reproduce the README's ensemble tables on Fashion-MNIST, small CNN (96 epochs: ~70 min on 2 quiet CPU cores).
#  1. snapshot ensembles and FGE at a 12-epoch budget, seeds 0 1 2: ensemble against its best member;
#  2. the budget view (B = 4 epochs): Ind = 1-3 independent 4-epoch SGD runs, SSE and FGE at 4/8/12 epochs.
# SSE is reported twice: all 6 snapshots (the paper's table), and the last 3 (the second half of the
# budget, the snapshots that trained longest). Both methods keep their cycle length fixed as the budget
# grows: SSE 2-epoch cosine cycles; FGE half the budget pretraining, then 1-epoch triangular cycles
# (one model each, so 6 models at 12 epochs).
set -euo pipefail
OUT=${OUT:-runs/ensembles}
FF=${FASTFLAT:-fastflat}
# The recipe these tables were made with, the defaults before fastcnn (later options win, e.g. sse's --lr 0.1)
CNN=(--model cnn --lr 0.05 --no-nesterov)
FGE="--method fge --fge-pretrain 0.5 --fge-cycle-epochs 1"
SSE="--method sse --lr 0.1"
run() { name=$1; shift; [ -f "$OUT/$name/summary.json" ] || $FF train "${CNN[@]}" "$@" --out "$OUT" --name "$name"; }
for seed in 0 1 2; do
  run sse12-s$seed $SSE --epochs 12 --sse-cycles 6 --seed $seed
  run fge12-s$seed $FGE --epochs 12 --seed $seed
  run sgd4-s$seed --method sgd --epochs 4 --seed $seed
done
run sse4-s0 $SSE --epochs 4 --sse-cycles 2 --seed 0
run sse8-s0 $SSE --epochs 8 --sse-cycles 4 --seed 0
run fge4-s0 $FGE --epochs 4 --seed 0
run fge8-s0 $FGE --epochs 8 --seed 0
for seed in 0 1 2; do  # snapshots of the budget's second half (cycles 4-6), from the saved members
  $FF ensemble --sse "$OUT/sse12-s$seed" --sse-keep 3 --json --out "$OUT/analysis" > "$OUT/sse12-s$seed/ensemble-last3.json"
done
python3 "$(dirname "$0")/ensembles_table.py" "$OUT"
$FF ensemble --budgets --sse-keep 3 --from "$OUT/sgd4-s0" --from "$OUT/sgd4-s1" --from "$OUT/sgd4-s2" \
  --sse "$OUT/sse4-s0" --sse "$OUT/sse8-s0" --sse "$OUT/sse12-s0" \
  --fge "$OUT/fge4-s0" --fge "$OUT/fge8-s0" --fge "$OUT/fge12-s0" --json --out "$OUT/analysis" > "$OUT/budgets.json"
