#!/usr/bin/env bash
# SAM's robustness claims on Fashion-MNIST (issue 12's first and third experiments), scaled to a 2-core CPU:
# the small CNN on a seeded 10,000-example subset of the training set (--subset 10000), test accuracy on the
# clean 10,000 test labels, seeds 0/1/2.
#  - label noise 0/20/40/60/80 %: SGD 8 epochs, SAM (rho 0.05) 8 epochs, SGD 16 epochs (the paper's rule:
#    SAM costs two gradients a step, so SGD gets twice the epochs);
#  - m-sharpness at 0 % noise: SAM with one perturbation per m = 8, 32 examples (m = 128 = the batch is the
#    SAM run of the first sweep).
# About 75 minutes on 2 cores. Then: python3 scripts/label_noise_table.py $OUT
set -euo pipefail
OUT=${OUT:-runs/label-noise}
FF=${FASTFLAT:-fastflat}
# The recipe these tables were made with, the defaults before fastcnn (later options win, e.g. sse's --lr 0.1)
CNN=(--model cnn --lr 0.05 --no-nesterov)
COMMON=(--dataset fashion-mnist --subset 10000 --eval-every 100 --out "$OUT")
run() {  # run NAME ARGS...: skipped when the run finished before, resumed when it was interrupted
  local name=$1; shift
  if [ -f "$OUT/$name/summary.json" ]; then return; fi
  if [ -d "$OUT/$name" ]; then $FF train --resume "$OUT/$name"; else $FF train "${CNN[@]}" "${COMMON[@]}" --name "$name" "$@"; fi
}
for seed in 0 1 2; do
  for noise in 0 0.2 0.4 0.6 0.8; do
    pct=$(python3 -c "print(round($noise * 100))")
    run "sgd-n$pct-s$seed" --method sgd --epochs 8 --label-noise $noise --seed $seed
    run "sam-n$pct-s$seed" --method sam --epochs 8 --label-noise $noise --seed $seed
    run "sgd2x-n$pct-s$seed" --method sgd --epochs 16 --label-noise $noise --seed $seed
  done
  for m in 8 32; do
    run "sam-m$m-s$seed" --method sam --sam-m $m --epochs 8 --seed $seed
  done
done
python3 "$(dirname "$0")/label_noise_table.py" "$OUT"
