#!/usr/bin/env bash
# "Which average?" (docs/results.md): SGD and SAM, alone and with SWA, EMA, LAWA, and schedule-free SGD, at one
# budget (4 epochs on a seeded 20,000-example subset of Fashion-MNIST, small CNN, batch 128), 3 seeds; then
# uniform and greedy soups of 4 fine-tunes of one pretrained run. About 40 minutes on a 2-core CPU.
# Skips runs that finished; rerun to continue. Table: python3 scripts/which_average_table.py runs/which-average
set -euo pipefail
OUT=${OUT:-runs/which-average}
FF=${FASTFLAT:-fastflat}
# The recipe these tables were made with, the defaults before fastcnn (later options win, e.g. sse's --lr 0.1)
CNN=(--model cnn --lr 0.05 --no-nesterov)
COMMON=(--epochs 4 --subset 20000)
run() { name=$1; shift; [ -f "$OUT/$name/summary.json" ] || $FF train "${CNN[@]}" "$@" "${COMMON[@]}" --out "$OUT" --name "$name"; }
for seed in 0 1 2; do
  for base in sgd sam; do
    run $base-s$seed --method $base --seed $seed
    # SWA over the last half, an average every quarter epoch (39 of 157 iterations): 8 models
    run $base-swa-s$seed --method $base --swa --swa-start 2 --swa-lr 0.01 --swa-cycle 39 --seed $seed
    run $base-ema-s$seed --method $base --ema 0.998 --ema-warmup timm --seed $seed
    run $base-lawa-s$seed --method $base --lawa 4 --lawa-every 78 --seed $seed  # the last 4 half-epochs
  done
  run sf-sgd-s$seed --method sgd --optimizer schedulefree-sgd --schedule constant --lr 0.5 --seed $seed
done
# Top Hessian eigenvalue of each delivered model (the average where there is one)
for seed in 0 1 2; do
  [ -f "$OUT/sharpness-s$seed/sharpness.json" ] || $FF sharpness "$OUT/sgd-s$seed" "$OUT/sam-s$seed" \
    "$OUT"/{sgd,sam}-swa-s$seed/members/swa.pt "$OUT"/{sgd,sam}-ema-s$seed/members/ema.pt \
    "$OUT"/{sgd,sam}-lawa-s$seed/members/lawa.pt "$OUT/sf-sgd-s$seed" --trace-probes 0 --out "$OUT" --name sharpness-s$seed
done
# Soups: one pretrained run and 4 fine-tunes from it at 4 learning rates, all on one seed's subset and
# validation split (never trained on), so the greedy soup chooses on examples no ingredient saw
SOUP=(--subset 20000 --val-split 0.1 --seed 11)
[ -f "$OUT/pre/summary.json" ] || $FF train "${CNN[@]}" --method sgd --epochs 4 "${SOUP[@]}" --out "$OUT" --name pre
for lr in 0.005 0.01 0.02 0.04; do
  [ -f "$OUT/ft-lr$lr/summary.json" ] || $FF train "${CNN[@]}" --method sgd --init "$OUT/pre" --epochs 1 --lr $lr "${SOUP[@]}" \
    --out "$OUT" --name ft-lr$lr
done
[ -f "$OUT/soup/soup.json" ] || $FF soup "$OUT"/ft-lr* --greedy --out "$OUT" --name soup
python3 "$(dirname "$0")/which_average_table.py" "$OUT"
