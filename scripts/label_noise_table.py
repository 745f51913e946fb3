"""Markdown tables of scripts/reproduce_label_noise.sh: clean test accuracy against label noise, and
against SAM's m. Each cell: the mean over the seeds that finished, +- their sample standard deviation."""

import json
import statistics
import sys
from pathlib import Path

NOISE = [0, 20, 40, 60, 80]
METHODS = [("sgd", "SGD, 8 epochs"), ("sam", "SAM rho 0.05, 8 epochs"), ("sgd2x", "SGD, 16 epochs")]


def by_seed(out: Path, pattern: str) -> dict[int, float]:
    """Test accuracy of each seed whose run finished."""
    found = {}
    for seed in range(3):
        path = out / pattern.format(seed=seed) / "summary.json"
        if path.exists():
            found[seed] = json.loads(path.read_text())["test_acc"]
    return found


def accuracies(out: Path, pattern: str) -> list[float]:
    return list(by_seed(out, pattern).values())


def cell(values: list[float]) -> str:
    if not values:
        return "-"
    spread = f" +- {statistics.stdev(values):.2f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.2f}{spread} (n={len(values)})"


def main(out: Path) -> None:
    print("| label noise | " + " | ".join(label for _, label in METHODS) + " | SAM - SGD (equal epochs) |")
    print("| --- |" + " --- |" * (len(METHODS) + 1))
    for pct in NOISE:
        seeds = {m: by_seed(out, f"{m}-n{pct}-s{{seed}}") for m, _ in METHODS}
        accs = {m: list(v.values()) for m, v in seeds.items()}
        paired = [seeds["sam"][s] - seeds["sgd"][s] for s in seeds["sam"] if s in seeds["sgd"]]  # same seed
        diff = cell(paired) if paired else "-"
        print(f"| {pct} % | " + " | ".join(cell(accs[m]) for m, _ in METHODS) + f" | {diff} |")
    print()
    print("| SAM m (examples per perturbation) | clean test accuracy (%) |")
    print("| --- | --- |")
    for m in (8, 32):
        print(f"| {m} | {cell(accuracies(out, f'sam-m{m}-s{{seed}}'))} |")
    print(f"| 128 (the batch) | {cell(accuracies(out, 'sam-n0-s{seed}'))} |")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/label-noise"))
