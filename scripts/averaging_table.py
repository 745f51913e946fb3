"""Markdown table of the averaging runs written by reproduce_averaging.sh: test error (%) per seed."""

import json
import statistics
import sys
from pathlib import Path

out = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/averaging")
rows = {"SGD (final weights of the SWA run)": [], "SWA": [], "SSE best member": [], "SSE ensemble": [],
        "FGE best member": [], "FGE ensemble": []}
for seed in (0, 1, 2):
    swa = json.loads((out / f"swa-s{seed}" / "summary.json").read_text())
    sse = json.loads((out / f"sse-s{seed}" / "summary.json").read_text())["ensemble"]
    fge = json.loads((out / f"fge-s{seed}" / "summary.json").read_text())["ensemble"]
    rows["SGD (final weights of the SWA run)"].append(100 - swa.get("iterate_acc", swa["test_acc"]))
    rows["SWA"].append(100 - swa["swa_acc"])
    rows["SSE best member"].append(100 - sse["best_member_acc"])
    rows["SSE ensemble"].append(100 - sse["ensemble"]["acc"])
    rows["FGE best member"].append(100 - fge["best_member_acc"])
    rows["FGE ensemble"].append(100 - fge["ensemble"]["acc"])
print("| model | test error, seeds 0 / 1 / 2 (%) | mean (%) |")
print("| --- | --- | --- |")
for name, errors in rows.items():
    print(f"| {name} | {' / '.join(f'{e:.2f}' for e in errors)} | {statistics.mean(errors):.2f} |")
