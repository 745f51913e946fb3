#!/usr/bin/env bash
# Full-batch GD against SGD at the same number of data passes (Geiping et al. 2022, scaled for a CPU):
# 1,024 Fashion-MNIST training examples, the small CNN, 100 full-batch steps = 100 epochs of SGD, 3 seeds.
# Rows: configs/fullbatch/fmnist-{sgd,baseline,clipped,regularized,strong-reg}.yaml. About 25 minutes
# on 2 cores. Then: python3 scripts/fullbatch_table.py $OUT
set -euo pipefail
OUT=${OUT:-runs/fullbatch}
FF=${FASTFLAT:-fastflat}
for seed in 0 1 2; do
  for row in sgd baseline clipped regularized strong-reg; do
    [ -f "$OUT/$row-s$seed/summary.json" ] || \
      $FF train --config "configs/fullbatch/fmnist-$row.yaml" --seed "$seed" --out "$OUT" --name "$row-s$seed"
  done
done
python3 "$(dirname "$0")/fullbatch_table.py" "$OUT"
