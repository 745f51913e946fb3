"""A table of `fastflat train` runs at 3 seeds on Fashion-MNIST, for the studies of docs/results.md "Time to accuracy":

    .venv/bin/python scripts/seeded_study.py ablation [OUT]     # each ingredient of the default recipe alone (~12 min)
    .venv/bin/python scripts/seeded_study.py sam-vs-sgd [OUT]   # SAM against SGD, 10 epochs and equal compute (~21 min)

Trains every row for seeds 0-2 under OUT (default runs/STUDY; a finished run is kept, not retrained), then
prints a Markdown table (test accuracy mean ± std, training seconds mean: the trainer's step time,
evaluation excluded) and writes it with every run's summary to benchmarks/results/STUDY-fashion-mnist-cpu/.
Run it on a quiet machine: some rows are there for their seconds.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import torch

import fastflat
from fastflat.runs.rundir import provenance

STUDIES = {  # study -> row -> overrides of today's defaults
    "ablation": {  # `fastflat train --method sgd`, one ingredient changed per row
        "default recipe (fastcnn, channels_last, lr 0.2 Nesterov, 3 epochs)": {"method": "sgd"},
        "- channels_last (--memory-format contiguous)": {"method": "sgd", "memory_format": "contiguous"},
        "- the narrower model (--model cnn --memory-format channels-last)": {"method": "sgd", "model": "cnn",
                                                                            "memory_format": "channels-last"},
        "- lr 0.2 with Nesterov (--lr 0.05 --no-nesterov)": {"method": "sgd", "lr": 0.05, "nesterov": False},
        "- the third epoch (--epochs 2)": {"method": "sgd", "epochs": 2},
        "+ label smoothing (--label-smoothing 0.1)": {"method": "sgd", "label_smoothing": 0.1},
        "+ EMA of the weights (--ema 0.998)": {"method": "sgd", "ema.decay": 0.998},
    },
    "sam-vs-sgd": {  # clean labels, a budget the new speed affords; SAM's step costs two of SGD's
        "SGD, 10 epochs": {"method": "sgd", "epochs": 10},
        "SAM (rho 0.05), 10 epochs": {"method": "sam", "epochs": 10},
        "SGD, 20 epochs (SAM's compute)": {"method": "sgd", "epochs": 20},
    },
}
SEEDS = (0, 1, 2)


def main(study: str, out: Path) -> None:
    rows, results = STUDIES[study], Path(f"benchmarks/results/{study}-fashion-mnist-cpu")
    table = ["| recipe | test accuracy (%) | training seconds |", "| --- | --- | --- |"]
    summaries = {}
    for row, overrides in rows.items():
        accs, secs = [], []
        for seed in SEEDS:
            name = f"{_slug(row)}-s{seed}"
            path = out / name / "summary.json"
            if not path.exists():
                fastflat.train({"seed": seed, "out": str(out), "name": name, **overrides})
            summary = json.loads(path.read_text())
            summaries[name] = summary
            accs.append(summary["test_acc"])
            secs.append(summary["train_seconds"])
        table.append(f"| {row} | {statistics.mean(accs):.2f} ± {statistics.stdev(accs):.2f} | {statistics.mean(secs):.1f} |")
        summaries[row] = {"test_acc": accs, "train_seconds": secs}
        print(table[-1], flush=True)
    results.mkdir(parents=True, exist_ok=True)
    (results / "table.md").write_text("\n".join(table) + "\n")
    (results / "summaries.json").write_text(json.dumps({"rows": rows, "seeds": SEEDS, "provenance": provenance(
        torch.device("cpu")), "runs": summaries}, indent=1, default=str) + "\n")
    print("\n".join(table))
    print(f"wrote {results}/table.md and summaries.json")


def _slug(row: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in row.split("(")[0].strip(" -+").lower()).strip("-")[:40]


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in STUDIES:
        sys.exit(f"usage: seeded_study.py {'|'.join(STUDIES)} [OUT]")
    main(sys.argv[1], Path(sys.argv[2] if len(sys.argv) > 2 else f"runs/{sys.argv[1]}"))
