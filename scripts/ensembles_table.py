"""Markdown table of the 12-epoch ensemble runs written by reproduce_ensembles.sh, per seed and mean.

Error rows are test error (%); "best member" is picked by its test accuracy, an oracle no user has,
so it is the strictest single-model baseline; "mean member" is what a model drawn from the run scores.
"""

import json
import statistics
import sys
from pathlib import Path

out = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/ensembles")
rows: dict[str, list[float]] = {}


def add(name: str, value: float | tuple[float, float]) -> None:
    rows.setdefault(name, []).append(value)


for method in ("sse", "fge"):
    tag = method.upper()
    for seed in (0, 1, 2):
        run = out / f"{method}12-s{seed}"
        report = json.loads((run / "summary.json").read_text())["ensemble"]
        members = report["members"]
        best = max(members, key=lambda m: m["acc"])
        add(f"{tag} first member", 100 - members[0]["acc"])
        add(f"{tag} mean member", statistics.mean(100 - m["acc"] for m in members))
        add(f"{tag} best member (picked on test)", 100 - best["acc"])
        add(f"{tag} ensemble of all {len(members)}", 100 - report["ensemble"]["acc"])
        last3 = run / "ensemble-last3.json"
        if last3.exists():
            last3 = json.loads(last3.read_text())["ensemble"]
            add(f"{tag} ensemble of the last 3", 100 - last3["acc"])
        add(f"{tag} NLL: best member vs ensemble of all", (best["nll"], report["ensemble"]["nll"]))
        if isinstance(last3, dict):
            add(f"{tag} NLL: best member vs ensemble of the last 3", (best["nll"], last3["nll"]))
        add(f"{tag} disagreement (%)", report["disagreement"])
print("| model | test error, seeds 0 / 1 / 2 (%) | mean (%) |")
print("| --- | --- | --- |")
for name, values in rows.items():
    if isinstance(values[0], tuple):
        cells = " / ".join(f"{a:.3f} vs {b:.3f}" for a, b in values)
        print(f"| {name} | {cells} | {statistics.mean(a for a, _ in values):.3f} vs {statistics.mean(b for _, b in values):.3f} |")
    else:
        print(f"| {name} | {' / '.join(f'{v:.2f}' for v in values)} | {statistics.mean(values):.2f} |")
