"""Markdown tables of the ensemble runs written by the reproduce scripts, per seed and mean.

    python scripts/ensembles_table.py runs/ensembles                  # reproduce_ensembles.sh (12 epochs)
    python scripts/ensembles_table.py --validation runs/ensembles-val # reproduce_ensembles_val.sh (16 epochs)

Error rows are test error (%). "Best member (picked on test)" is an oracle no user has, so it is the
strictest single-model baseline; "picked on validation" is the member a user would keep, chosen on
the run's held-out validation split; "mean member" is what a model drawn from the run scores.
"""

import json
import statistics
import sys
from pathlib import Path

rows: dict[str, list] = {}


def add(name: str, value) -> None:
    rows.setdefault(name, []).append(value)


def common_rows(tag: str, report: dict) -> dict:
    """Rows every table has, from the run's own end-of-training report over all its members."""
    members = report["members"]
    best = max(members, key=lambda m: m["acc"])
    add(f"{tag} first member", 100 - members[0]["acc"])
    add(f"{tag} mean member", statistics.mean(100 - m["acc"] for m in members))
    add(f"{tag} best member (picked on test)", 100 - best["acc"])
    add(f"{tag} ensemble of all {len(members)}", 100 - report["ensemble"]["acc"])
    return best


def runs(out: Path, epochs: int):
    """(SSE | FGE, run directory, its end-of-training ensemble report) for both methods, seeds 0-2."""
    for method in ("sse", "fge"):
        for seed in (0, 1, 2):
            run = out / f"{method}{epochs}-s{seed}"
            yield method.upper(), run, json.loads((run / "summary.json").read_text())["ensemble"]


def twelve_epochs(out: Path) -> None:
    for tag, run, report in runs(out, 12):
        best = common_rows(tag, report)
        last3 = run / "ensemble-last3.json"
        if last3.exists():
            last3 = json.loads(last3.read_text())["ensemble"]
            add(f"{tag} ensemble of the last 3", 100 - last3["acc"])
        add(f"{tag} NLL: best member vs ensemble of all", (best["nll"], report["ensemble"]["nll"]))
        if isinstance(last3, dict):
            add(f"{tag} NLL: best member vs ensemble of the last 3", (best["nll"], last3["nll"]))
        add(f"{tag} disagreement (%)", report["disagreement"])


def with_validation(out: Path) -> None:
    for tag, run, report in runs(out, 16):
        chosen = json.loads((run / "ensemble-val.json").read_text())
        val = chosen["validation"]
        best = common_rows(tag, report)
        add(f"{tag} best member (picked on validation)", 100 - val["best_member_test"]["acc"])
        if tag == "SSE":  # FGE ensembles every member: its row is the "ensemble of all" above
            add(f"{tag} ensemble of the last k (k on validation)", 100 - chosen["ensemble"]["acc"])
            add(f"{tag} k chosen", len(chosen["members"]))
        add(f"{tag} NLL: best member (test pick) vs ensemble", (best["nll"], chosen["ensemble"]["nll"]))
        add(f"{tag} disagreement (%)", chosen["disagreement"])


def main(args: list[str]) -> None:
    if args and args[0] == "--validation":
        with_validation(Path(args[1] if len(args) > 1 else "runs/ensembles-val"))
    else:
        twelve_epochs(Path(args[0] if args else "runs/ensembles"))
    print("| model | test error, seeds 0 / 1 / 2 (%) | mean (%) |")
    print("| --- | --- | --- |")
    for name, values in rows.items():
        if isinstance(values[0], tuple):
            cells = " / ".join(f"{a:.3f} vs {b:.3f}" for a, b in values)
            means = f"{statistics.mean(a for a, _ in values):.3f} vs {statistics.mean(b for _, b in values):.3f}"
            print(f"| {name} | {cells} | {means} |")
        elif isinstance(values[0], int):
            print(f"| {name} | {' / '.join(str(v) for v in values)} | |")
        else:
            print(f"| {name} | {' / '.join(f'{v:.2f}' for v in values)} | {statistics.mean(values):.2f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
