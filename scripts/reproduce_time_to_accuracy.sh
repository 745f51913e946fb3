#!/usr/bin/env bash
# Reproduce docs/results.md "Time to accuracy", on a quiet machine (the seconds are the result):
#  1. `fastflat bench recipe`: the old main job, the default sam and sgd runs and a plain PyTorch loop,
#     seeds 0 1 2, in one run (~15 min on 2 cores): JSON, CSV and plot into benchmarks/results/;
#  2. the ablation: each ingredient of the default recipe taken away alone, 3 seeds (~12 min);
#  3. SAM against SGD on clean labels, 10 epochs and equal compute, 3 seeds (~21 min);
#  4. the 93% recipe: one documented command, timed as a user would run it (~9 min).
set -euo pipefail
FF=${FASTFLAT:-fastflat}
PY=${PYTHON:-python}
OUT=${OUT:-runs/time-to-accuracy}
$FF bench recipe --seeds 0,1,2 --out benchmarks/results
$PY scripts/seeded_study.py ablation "$OUT/ablation"
$PY scripts/seeded_study.py sam-vs-sgd "$OUT/sam-vs-sgd"
[ -f "$OUT/best93/summary.json" ] || $FF train --config configs/recipes/fmnist-93.yaml --out "$OUT" --name best93
