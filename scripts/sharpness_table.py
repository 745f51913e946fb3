"""Markdown table of scripts/reproduce_sharpness.sh: top eigenvalue, trace and test error per solution."""

import json
import statistics
import sys
from pathlib import Path

LABELS = [("sgd-s{}", "SGD"), ("sam-s{}", "SAM (rho 0.05)"), ("swa-s{}", "SGD iterate of the SWA run"),
          ("swa-s{}/members/swa.pt", "SWA average")]


def main(out: Path) -> None:
    rows = {label: {"eig": [], "trace": [], "err": [], "msharp": []} for _, label in LABELS}
    for seed in range(3):
        path = out / f"sharpness-s{seed}" / "sharpness.json"
        if not path.exists():
            continue
        measured = {Path(c["checkpoint"]).as_posix(): c for c in json.loads(path.read_text())["checkpoints"]}
        for pattern, label in LABELS:
            key = (out / pattern.format(seed)).as_posix()
            summary = json.loads((out / f"{pattern.split('/')[0].format(seed)}" / "summary.json").read_text())
            acc = summary["swa_acc"] if label == "SWA average" else summary["test_acc"]
            rows[label]["eig"].append(measured[key]["top_eigenvalues"][0])
            rows[label]["trace"].append(measured[key]["trace"])
            rows[label]["err"].append(100 - acc)
            extra = out / f"msharp-s{seed}" / "sharpness.json"  # m-sharpness, measured in a second pass
            if extra.exists():
                more = {Path(c["checkpoint"]).as_posix(): c for c in json.loads(extra.read_text())["checkpoints"]}
                rows[label]["msharp"].append(more[key]["sharpness"]["l2_m128"])
    print("| solution | top eigenvalue, seeds 0 / 1 / 2 | mean | trace, mean | m-sharpness (L2, m 128, rho 0.05), "
          "seeds 0 / 1 / 2 | test error (%), mean |")
    print("| --- | --- | --- | --- | --- | --- |")
    for _, label in LABELS:
        r = rows[label]
        if r["eig"]:
            msharp = " / ".join(f"{v:.4f}" for v in r["msharp"]) or "-"
            print(f"| {label} | {' / '.join(f'{v:.2f}' for v in r['eig'])} | {statistics.mean(r['eig']):.2f} | "
                  f"{statistics.mean(r['trace']):.1f} | {msharp} | {statistics.mean(r['err']):.2f} |")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/sharpness"))
