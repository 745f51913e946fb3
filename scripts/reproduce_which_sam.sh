#!/usr/bin/env bash
# "Which SAM?" (docs/results.md): SGD, SAM, every --sam-variant and every ascent schedule, on the label-noise
# setup of scripts/reproduce_label_noise.sh (small CNN, a seeded 10,000-example subset of Fashion-MNIST, batch
# 128, 8 epochs, clean test labels), at 80% label noise and on clean labels, seeds 0/1/2; then the top Hessian
# eigenvalue of every model (fastflat sharpness, 1,024 examples). About 90 minutes on a 2-core CPU.
# Skips runs that finished, resumes interrupted ones. Table and plot: python3 scripts/which_sam_table.py $OUT
set -euo pipefail
OUT=${OUT:-runs/which-sam}
FF=${FASTFLAT:-fastflat}
# The recipe these tables were made with, the defaults before fastcnn (later options win, e.g. sse's --lr 0.1)
CNN=(--model cnn --lr 0.05 --no-nesterov)
COMMON=(--dataset fashion-mnist --subset 10000 --epochs 8 --eval-every 100 --out "$OUT")
declare -A ARGS=(
  [sgd]="--method sgd"
  [sam]="--method sam"
  [gsam]="--method sam --sam-variant gsam"
  [fsam]="--method sam --sam-variant fsam"
  [wsam]="--method sam --sam-variant wsam"
  [msam]="--method sam --sam-variant msam --rho 0.3"  # its authors' radii are several times SAM's (3 at lr 0.5)
  [esam]="--method sam --sam-variant esam"
  [looksam]="--method sam --sam-variant looksam"
  [sam-on]="--method sam --sam-only norm"
  [sam-every5]="--method sam --sam-every 5"
  [sam-prob0.2]="--method sam --sam-prob 0.2"
  [sam-from0.8]="--method sam --sam-from 0.8"
)
ORDER=(sgd sam gsam fsam wsam msam esam looksam sam-on sam-every5 sam-prob0.2 sam-from0.8)
run() {  # run NAME ARGS...: skipped when finished, resumed when interrupted
  local name=$1; shift
  if [ -f "$OUT/$name/summary.json" ]; then return; fi
  if [ -d "$OUT/$name" ]; then $FF train --resume "$OUT/$name"; else $FF train "${CNN[@]}" "${COMMON[@]}" --name "$name" "$@"; fi
}
for noise in 0.8 0; do
  pct=$(python3 -c "print(round($noise * 100))")
  for seed in 0 1 2; do
    for method in "${ORDER[@]}"; do
      # shellcheck disable=SC2086
      run "$method-n$pct-s$seed" ${ARGS[$method]} --label-noise $noise --seed $seed
    done
    name=sharpness-n$pct-s$seed
    runs=(); for method in "${ORDER[@]}"; do runs+=("$OUT/$method-n$pct-s$seed"); done
    [ -f "$OUT/$name/sharpness.json" ] || $FF sharpness "${runs[@]}" --trace-probes 0 --out "$OUT" --name "$name"
  done
done
python3 "$(dirname "$0")/which_sam_table.py" "$OUT"
