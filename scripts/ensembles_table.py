"""Markdown table of the 12-epoch ensemble runs written by reproduce_ensembles.sh: test error (%) per seed."""

import json
import statistics
import sys
from pathlib import Path

out = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/ensembles")
rows: dict[str, list[float]] = {}
for seed in (0, 1, 2):
    swa = json.loads((out / f"swa12-s{seed}" / "summary.json").read_text())
    rows.setdefault("SGD (final weights of the SWA run)", []).append(100 - swa["test_acc"])
    rows.setdefault(f"SWA ({swa['swa_models_averaged']} models)", []).append(100 - swa["swa_acc"])
for method in ("sse", "fge"):
    for seed in (0, 1, 2):
        report = json.loads((out / f"{method}12-s{seed}" / "summary.json").read_text())["ensemble"]
        members = report["members"]
        for name, error in ((f"{method.upper()} first member", 100 - members[0]["acc"]),
                            (f"{method.upper()} best member", 100 - report["best_member_acc"]),
                            (f"{method.upper()} ensemble of {len(members)}", 100 - report["ensemble"]["acc"]),
                            (f"{method.upper()} disagreement (%)", report["disagreement"])):
            rows.setdefault(name, []).append(error)
        last3 = out / f"{method}12-s{seed}" / "ensemble-last3.json"
        if last3.exists():
            rows.setdefault(f"{method.upper()} ensemble of the last 3", []).append(100 - json.loads(last3.read_text())["ensemble"]["acc"])
print("| model | test error, seeds 0 / 1 / 2 (%) | mean (%) |")
print("| --- | --- | --- |")
for name, values in rows.items():
    print(f"| {name} | {' / '.join(f'{v:.2f}' for v in values)} | {statistics.mean(values):.2f} |")
