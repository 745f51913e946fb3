#!/usr/bin/env bash
# Issue 11's pictures on Fashion-MNIST with the small CNN (about an hour on 2 cores):
#  1. two SGD runs from seeds 0 and 1 (4 epochs), and a Bezier curve trained between them (4 epochs);
#     the curve and the straight segment evaluated at 61 values of t on 5,000 seeded examples;
#  2. an FGE run (2 epochs pretraining, then 4 cycles of half an epoch; weights saved every 20 steps):
#     the plane (15 x 15 points, 2,000 examples each) through its first three collected models, with
#     its trajectory projected onto it;
#  3. an SWA run (4 epochs, averaging over the last two): the line from the SWA weights to the run's
#     final SGD weights, and random rays from both.
# Results land in $OUT; the figures and JSON are copied to benchmarks/results/landscape-fashion-mnist-cpu.
set -euo pipefail
OUT=${OUT:-runs/landscape}
FF=${FASTFLAT:-fastflat}
# The recipe these tables were made with, the defaults before fastcnn (later options win, e.g. sse's --lr 0.1)
CNN=(--model cnn --lr 0.05 --no-nesterov)
DEST=${DEST:-benchmarks/results/landscape-fashion-mnist-cpu}
EX=(--examples 5000)
train() {  # train NAME ARGS...: skipped when finished, resumed when interrupted
  local name=$1; shift
  if [ -f "$OUT/$name/summary.json" ]; then return; fi
  if [ -d "$OUT/$name" ]; then $FF train --resume "$OUT/$name"; else $FF train "${CNN[@]}" --out "$OUT" --name "$name" "$@"; fi
}
train sgd-s0 --method sgd --epochs 4 --seed 0
train sgd-s1 --method sgd --epochs 4 --seed 1
if [ -d "$OUT/bezier" ]; then $FF curve --resume "$OUT/bezier" --points 61 "${EX[@]}"
else $FF curve --from "$OUT/sgd-s0" --to "$OUT/sgd-s1" --curve bezier --epochs 4 --points 61 "${EX[@]}" --out "$OUT" --name bezier; fi
$FF ensemble --curve "$OUT/bezier" --points 5 --json --out "$OUT/analysis" > "$OUT/bezier/ensemble-curve.json"
train fge --method fge --epochs 4 --seed 2 --trajectory-every 20
[ -f "$OUT/plane-fge/plane.json" ] || $FF landscape plane --at "$OUT/fge/members/fge-01.pt" --at "$OUT/fge/members/fge-02.pt" \
  --at "$OUT/fge/members/fge-03.pt" --trajectory "$OUT/fge" --grid 15 --margin 0.3 --examples 2000 --out "$OUT" --name plane-fge
train swa --method swa --epochs 4 --swa-start 0.5 --swa-lr 0.01 --seed 3
[ -f "$OUT/line-swa/line.json" ] || $FF landscape line --from "$OUT/swa" --to "$OUT/swa/members/swa.pt" --range -1 2 \
  --points 25 --examples 2000 --out "$OUT" --name line-swa  # t = 0: the SGD iterate, t = 1: SWA
[ -f "$OUT/rays-swa/rays.json" ] || $FF landscape rays --at "$OUT/swa/members/swa.pt" --at "$OUT/swa" --directions 4 \
  --distance 40 --points 9 --examples 2000 --out "$OUT" --name rays-swa
mkdir -p "$DEST"
cp "$OUT"/bezier/curve.{json,png} "$OUT"/bezier/ensemble-curve.json "$DEST"/
for d in plane-fge line-swa rays-swa; do cp "$OUT/$d"/*.json "$OUT/$d"/*.png "$DEST"/; done
for r in sgd-s0 sgd-s1 bezier fge swa; do cp "$OUT/$r/summary.json" "$DEST/summary-$r.json"; done
