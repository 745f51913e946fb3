"""Markdown tables of the runs written by reproduce_spartan.sh: test accuracy per seed, and per round."""

import json
import statistics
import sys
from pathlib import Path

out = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/spartan")
names = {"sgd": "SGD", "es": "Spartan, es mutation", "grad": "Spartan, grad mutation"}
print("| method | test accuracy, seeds 0 / 1 / 2 (%) | mean (%) |")
print("| --- | --- | --- |")
for key, name in names.items():
    accs = [json.loads((out / f"{key}-s{seed}" / "summary.json").read_text())["test_acc"] for seed in (0, 1, 2)]
    print(f"| {name} | {' / '.join(f'{a:.2f}' for a in accs)} | {statistics.mean(accs):.2f} |")
print()
print("| run | round | parent loss | children best / mean loss | held-out acc after (%) | replaced |")
print("| --- | --- | --- | --- | --- | --- |")
for key in ("es", "grad"):
    for line in (out / f"{key}-s0" / "evolution.jsonl").read_text().splitlines():
        r = json.loads(line)
        print(f"| {key}-s0 | {r['round']} | {r['parent_loss']:.4f} | {r['children_best_loss']:.4f} / "
              f"{r['children_mean_loss']:.4f} | {r['heldout_acc']:.2f} | {r['replaced']} |")
