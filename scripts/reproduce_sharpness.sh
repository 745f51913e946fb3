#!/usr/bin/env bash
# Hessian sharpness of SGD, SAM and SWA solutions on Fashion-MNIST (issue 12's second experiment):
# the small CNN, the same 4-epoch budget, seeds 0/1/2; SWA averages every quarter epoch over the last two
# epochs (its run's final SGD iterate is measured too). Each checkpoint: the top Hessian eigenvalue
# (Lanczos, tol 1e-2) and the trace (Hutchinson, 16 probes) on the first 2,048 training examples, eval mode.
# About 40 minutes on 2 cores. Then: python3 scripts/sharpness_table.py $OUT
set -euo pipefail
OUT=${OUT:-runs/sharpness}
FF=${FASTFLAT:-fastflat}
# The recipe these tables were made with, the defaults before fastcnn (later options win, e.g. sse's --lr 0.1)
CNN=(--model cnn --lr 0.05 --no-nesterov)
for seed in 0 1 2; do
  for method in sgd sam; do
    [ -f "$OUT/$method-s$seed/summary.json" ] || \
      $FF train "${CNN[@]}" --method $method --epochs 4 --seed $seed --out "$OUT" --name "$method-s$seed"
  done
  [ -f "$OUT/swa-s$seed/summary.json" ] || \
    $FF train "${CNN[@]}" --method swa --epochs 4 --swa-start 0.5 --swa-lr 0.01 --seed $seed --out "$OUT" --name "swa-s$seed"
  [ -f "$OUT/sharpness-s$seed/sharpness.json" ] || \
    $FF sharpness "$OUT/sgd-s$seed" "$OUT/sam-s$seed" "$OUT/swa-s$seed" "$OUT/swa-s$seed/members/swa.pt" \
      --examples 2048 --top 1 --trace-probes 16 --tol 1e-2 --out "$OUT" --name "sharpness-s$seed"
  [ -f "$OUT/msharp-s$seed/sharpness.json" ] || \
    $FF sharpness "$OUT/sgd-s$seed" "$OUT/sam-s$seed" "$OUT/swa-s$seed" "$OUT/swa-s$seed/members/swa.pt" \
      --examples 2048 --top 1 --trace-probes 0 --tol 0.1 --m 128 --ball l2 --rho 0.05 --out "$OUT" --name "msharp-s$seed"
done
python3 "$(dirname "$0")/sharpness_table.py" "$OUT"
