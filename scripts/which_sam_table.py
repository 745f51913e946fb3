"""The "Which SAM?" table and plot from the runs of reproduce_which_sam.sh.

    python3 scripts/which_sam_table.py runs/which-sam [benchmarks/results/which-sam-fashion-mnist-cpu]

For each label-noise level: test accuracy mean +- sd over the seeds that finished, training seconds (mean),
time as a multiple of SGD's, the share of SAM's gain over SGD kept, and the top Hessian eigenvalue (mean).
With a second argument, copies every summary and sharpness report there, writes the table to
which-sam.md and draws which-sam.png: accuracy against training time, the Pareto front joined.
"""

import json
import shutil
import statistics
import sys
from pathlib import Path

out = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/which-sam")
dest = Path(sys.argv[2]) if len(sys.argv) > 2 else None
SEEDS, NOISES = (0, 1, 2), (80, 0)
ROWS = ["sgd", "sam", "gsam", "fsam", "wsam", "msam", "esam", "looksam", "sam-on", "sam-every5", "sam-prob0.2",
        "sam-from0.8"]


def mean_sd(values):
    return f"{statistics.mean(values):.2f} +- {statistics.stdev(values):.2f}" if len(values) > 1 else f"{values[0]:.2f}"


def eigenvalue(noise, seed, run):
    path = out / f"sharpness-n{noise}-s{seed}" / "sharpness.json"
    if not path.exists():
        return None
    for entry in json.loads(path.read_text())["checkpoints"]:
        if Path(entry["checkpoint"]).name == run:
            return entry["top_eigenvalues"][0]
    return None


def collect(noise):
    found = {}
    for row in ROWS:
        runs = [out / f"{row}-n{noise}-s{seed}" for seed in SEEDS]
        summaries = [(run, json.loads((run / "summary.json").read_text())) for run in runs if (run / "summary.json").exists()]
        if summaries:
            eig = [e for run, _ in summaries if (e := eigenvalue(noise, run.name.rsplit("-s", 1)[1], run.name)) is not None]
            found[row] = {"acc": [s["test_acc"] for _, s in summaries], "seconds": [s["train_seconds"] for _, s in summaries],
                          "eig": eig}
    return found


def table(noise, found):
    lines = [f"**{noise}% label noise**" if noise else "**clean labels**", "",
             "| method | test accuracy (%) | seconds | x SGD time | SAM's gain kept | top eigenvalue |",
             "| --- | --- | --- | --- | --- | --- |"]
    sgd, sam = found.get("sgd"), found.get("sam")
    for row, r in found.items():
        seconds = statistics.mean(r["seconds"])
        ratio = seconds / statistics.mean(sgd["seconds"]) if sgd else float("nan")
        gain = "n/a"
        if sgd and sam and row not in ("sgd", "sam"):
            sam_gain = statistics.mean(sam["acc"]) - statistics.mean(sgd["acc"])
            gain = f"{100 * (statistics.mean(r['acc']) - statistics.mean(sgd['acc'])) / sam_gain:.0f}%" if sam_gain > 0 else "n/a"
        eig = f"{statistics.mean(r['eig']):.1f}" if r["eig"] else "n/a"
        lines.append(f"| {row} | {mean_sd(r['acc'])} (n={len(r['acc'])}) | {seconds:.0f} | {ratio:.2f} | {gain} | {eig} |")
    return "\n".join(lines)


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.5), squeeze=False)
    for ax, (noise, found) in zip(axes[0], results.items()):
        points = [(statistics.mean(r["seconds"]), statistics.mean(r["acc"]), row) for row, r in found.items()]
        for seconds, acc, row in points:
            ax.scatter(seconds, acc, color="C3" if row == "sam" else "C0" if row == "sgd" else "C2")
            ax.annotate(row, (seconds, acc), textcoords="offset points", xytext=(4, 3), fontsize=8)
        front, best = [], -1.0
        for seconds, acc, _ in sorted(points):
            if acc > best:
                front.append((seconds, acc))
                best = acc
        ax.plot(*zip(*front), color="0.5", linestyle="--", label="Pareto front")
        ax.set_xlabel("training time (s, 2-core CPU)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{noise}% label noise" if noise else "clean labels")
        ax.legend(loc="lower right")
    fig.suptitle("Which SAM? Fashion-MNIST, small CNN, 10,000 examples, 8 epochs (mean of seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


results = {noise: collect(noise) for noise in NOISES}
results = {noise: found for noise, found in results.items() if found}
text = "\n\n".join(table(noise, found) for noise, found in results.items())
print(text)
if dest is not None:
    dest.mkdir(parents=True, exist_ok=True)
    for run in sorted(out.iterdir()):
        for name in ("summary.json", "sharpness.json"):
            if (run / name).exists():
                shutil.copy(run / name, dest / f"{run.name}.json")
    (dest / "which-sam.md").write_text(text + "\n")
    plot(results, dest / "which-sam.png")
    print(f"copied to {dest}")
