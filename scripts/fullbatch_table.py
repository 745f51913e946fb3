"""Markdown table of scripts/reproduce_fullbatch.sh's runs: test accuracy per seed and mean, per row."""

import json
import statistics
import sys
from pathlib import Path

ROWS = [("sgd", "SGD, 100 epochs (batch 128)"), ("baseline", "FB baseline (lr 0.1)"),
        ("clipped", "FB clipped (lr 0.4, clip 0.25)"), ("regularized", "FB clipped + regularized (blocks of 128)"),
        ("strong-reg", "FB strong reg. (blocks of 32)")]


def main(out: Path) -> None:
    print("| row | test accuracy, seeds 0 / 1 / 2 (%) | mean (%) | train loss, mean |")
    print("| --- | --- | --- | --- |")
    for key, label in ROWS:
        runs = [json.loads((out / f"{key}-s{seed}" / "summary.json").read_text()) for seed in range(3)
                if (out / f"{key}-s{seed}" / "summary.json").exists()]
        if not runs:
            continue
        accs = [r["test_acc"] for r in runs]
        print(f"| {label} | {' / '.join(f'{a:.2f}' for a in accs)} | {statistics.mean(accs):.2f} | "
              f"{statistics.mean(r['train_loss'] for r in runs):.4f} |")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/fullbatch"))
