#!/usr/bin/env bash
# The top Hessian eigenvalue: fastflat's Lanczos (random start, and fastflat sharpness's start from every 8th
# example) against PyHessian 0.1 and against PyHessian's stopping rule on our products, 5 start seeds each,
# on three models: the small CNN trained 2 epochs with SGD and fastflat's default run (fastcnn, SGD, 3 epochs),
# each on its first 1,024 training examples, and the small CNN at initialisation on 2,048. Tolerances 1e-3
# (PyHessian's default) and 1e-4. Needs `pip install pyhessian`. About 20 minutes on 2 cores.
set -euo pipefail
OUT=${OUT:-runs/hessian}
FF=${FASTFLAT:-fastflat}
[ -f "$OUT/sgd0/summary.json" ] || \
  $FF train --method sgd --model cnn --lr 0.05 --no-nesterov --epochs 2 --out "$OUT" --name sgd0
[ -f "$OUT/fastcnn-default/summary.json" ] || $FF train --out "$OUT" --name fastcnn-default
for tol in 1e-3 1e-4; do
  $FF bench hessian --checkpoint "$OUT/sgd0" --examples 1024 --tol $tol --seeds 0,1,2,3,4 --out "$OUT"
  $FF bench hessian --checkpoint "$OUT/fastcnn-default" --examples 1024 --tol $tol --seeds 0,1,2,3,4 --out "$OUT"
done
$FF bench hessian --model cnn --examples 2048 --seeds 0,1,2,3,4 --out "$OUT"
