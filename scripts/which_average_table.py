"""The "Which average?" table and plot from the runs of reproduce_which_average.sh.

    python3 scripts/which_average_table.py runs/which-average [benchmarks/results/which-average-fashion-mnist-cpu]

Prints a markdown table: test error of the model each run delivers (the average where there is one),
mean +- sd over 3 seeds, its test NLL, and its top Hessian eigenvalue; then the soups. With a second
argument, copies every summary and report there and draws which-average.png.
"""

import json
import shutil
import statistics
import sys
from pathlib import Path

out = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/which-average")
dest = Path(sys.argv[2]) if len(sys.argv) > 2 else None
SEEDS = (0, 1, 2)
ROWS = [("SGD", "sgd", None), ("SGD + SWA", "sgd-swa", "swa"), ("SGD + EMA", "sgd-ema", "ema"),
        ("SGD + LAWA", "sgd-lawa", "lawa"), ("schedule-free SGD", "sf-sgd", None), ("SAM", "sam", None),
        ("SAM + SWA", "sam-swa", "swa"), ("SAM + EMA", "sam-ema", "ema"), ("SAM + LAWA", "sam-lawa", "lawa")]


def mean_sd(values):
    return f"{statistics.mean(values):.2f} +- {statistics.stdev(values):.2f}"


def top_eigenvalue(seed, run, member):
    report = json.loads((out / f"sharpness-s{seed}" / "sharpness.json").read_text())
    path = str(out / run / "members" / f"{member}.pt") if member else str(out / run)
    return next(r["top_eigenvalues"][0] for r in report["checkpoints"] if r["checkpoint"] == path)


print("| model delivered | test error (%), mean +- sd | seeds 0 / 1 / 2 | test NLL | top Hessian eigenvalue |")
print("| --- | --- | --- | --- | --- |")
plotted = []
for label, run, member in ROWS:
    summaries = [json.loads((out / f"{run}-s{seed}" / "summary.json").read_text()) for seed in SEEDS]
    errors = [100 - s["test_acc"] for s in summaries]
    nll = statistics.mean(s["test_loss"] for s in summaries)
    eigen = [top_eigenvalue(seed, f"{run}-s{seed}", member) for seed in SEEDS]
    print(f"| {label} | {mean_sd(errors)} | {' / '.join(f'{e:.2f}' for e in errors)} | {nll:.4f} | {mean_sd(eigen)} |")
    plotted.append((label, statistics.mean(errors), statistics.stdev(errors)))

soup = json.loads((out / "soup" / "soup.json").read_text())
print()
print("| soups of 4 fine-tunes (one pretrained run, seed 11) | validation acc. (%) | test error (%) | test NLL |")
print("| --- | --- | --- | --- |")
for i in soup["ingredients"]:
    print(f"| {Path(i['run']).name} | {i['val_acc']:.2f} | {100 - i['test']['acc']:.2f} | {i['test']['nll']:.4f} |")
for kind in ("uniform", "greedy"):
    s = soup[kind]
    names = ", ".join(Path(m).name for m in s["members"])
    print(f"| {kind} soup ({names}) | {s['val_acc']:.2f} | {100 - s['test']['acc']:.2f} | {s['test']['nll']:.4f} |")
e = soup["ensemble"]["test"]
print(f"| ensemble of all 4 | | {100 - e['acc']:.2f} | {e['nll']:.4f} |")

if dest is not None:
    dest.mkdir(parents=True, exist_ok=True)
    for label, run, _ in ROWS:
        for seed in SEEDS:
            shutil.copy(out / f"{run}-s{seed}" / "summary.json", dest / f"summary-{run}-s{seed}.json")
    for seed in SEEDS:
        shutil.copy(out / f"sharpness-s{seed}" / "sharpness.json", dest / f"sharpness-s{seed}.json")
    shutil.copy(out / "soup" / "soup.json", dest / "soup.json")
    shutil.copy(out / "soup" / "soup.png", dest / "soup.png")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    labels, means, sds = zip(*plotted)
    ax.bar(range(len(labels)), means, yerr=sds, capsize=4, color=["C0"] * 5 + ["C1"] * 4)
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax.set_ylim(min(means) - 1.0, max(means) + 0.6)
    ax.set_xlabel("model delivered (4 epochs, 20,000 Fashion-MNIST examples)")
    ax.set_ylabel("test error (%), mean +- sd of 3 seeds")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(dest / "which-average.png", dpi=110)
    print(f"\nwrote {dest}")
