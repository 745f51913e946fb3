"""One self-contained HTML page for runs and analysis results (`fastflat report RUN...`).

A folder fastflat wrote is shown as what it holds: a training run as its summary, its per-epoch table and
its figures; an analysis result (ensemble, sharpness, plane, line, rays, curve, toy) as its headline
numbers and figures. Several training runs also get one comparison table at the top: a study on one
page. Every image is inlined as a data: URI, so the page can be mailed or attached as one file; a
small script marks the page when an image fails to decode (the test opens it in headless Chromium).
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

from fastflat.errors import UserError

SUMMARY_KEYS = [("method", "method"), ("model", "model"), ("dataset", "dataset"), ("test_acc", "test accuracy (%)"),
                ("delivered", "model delivered"), ("iterate_acc", "last iterate accuracy (%)"), ("test_loss", "test loss"),
                ("epochs", "epochs"), ("steps", "steps"), ("train_seconds", "training seconds")]
ANALYSES = ("ensemble", "sharpness", "plane", "line", "rays", "curve", "toy")  # <name>.json an analysis writes
STYLE = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}img{max-width:100%;border:1px solid #eee}
h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}.dim{color:#777;font-size:.9em}
#broken{display:none;background:#fdd;padding:.5em}"""
CHECK_IMAGES = """window.addEventListener("load", () => {
  const images = [...document.images], shown = images.filter(i => i.complete && i.naturalWidth > 0);
  document.body.dataset.imagesShown = shown.length + "/" + images.length;
  if (shown.length < images.length) document.getElementById("broken").style.display = "block";
});"""


def build_report(folders: list[Path], title: str | None = None) -> str:
    """The page for `folders`, each a run directory or an analysis result directory."""
    if not folders:
        raise UserError("fastflat report needs at least one run or results directory")
    for folder in folders:
        if not folder.is_dir():
            raise UserError(f"{folder} is not a directory: give run directories or results directories")
    summaries = {folder: _read_json(folder / "summary.json") for folder in folders}
    sections = []
    trained = [f for f in folders if summaries[f] is not None]
    if len(trained) > 1:
        sections.append("<h2>Runs side by side</h2>" + _table(
            ["run"] + [label for _, label in SUMMARY_KEYS],
            [[f.name] + [_cell(summaries[f].get(key)) for key, _ in SUMMARY_KEYS] for f in trained]))
    for folder in folders:
        sections.append(_section(folder, summaries[folder]))
    heading = title or ("fastflat report: " + ", ".join(f.name for f in folders))
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{_e(heading)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{_e(heading)}</h1>"
            f"<p id=broken>Some figures could not be shown.</p>{''.join(sections)}"
            f"<script>{CHECK_IMAGES}</script></body></html>\n")


def _section(folder: Path, summary: dict[str, Any] | None) -> str:
    parts = [f"<h2>{_e(folder.name)}</h2><p class=dim>{_e(str(folder))}</p>"]
    if summary is not None:
        parts.append(_table(["", ""], [[label, _cell(summary.get(key))] for key, _label in SUMMARY_KEYS
                                       for label in [_label] if summary.get(key) is not None]))
        records = _read_jsonl(folder / "metrics.jsonl")
        columns = [c for c in ("epoch", "train_loss", "train_acc", "val_acc", "test_loss", "test_acc", "lr",
                               "epoch_seconds") if any(c in r for r in records)]
        if records:
            parts.append("<h3>Per epoch</h3>" + _table(columns, [[_cell(r.get(c)) for c in columns] for r in records]))
        parts.append(_provenance(summary.get("provenance")))
    for name in ANALYSES:
        result = _read_json(folder / f"{name}.json")
        if isinstance(result, dict):
            scalars = [[key, _cell(value)] for key, value in result.items() if isinstance(value, (int, float, str))
                       and not isinstance(value, bool) and len(str(value)) < 120]
            parts.append(f"<h3>{_e(name)}</h3>" + _table(["", ""], scalars) + _provenance(result.get("provenance")))
    for image in sorted(folder.glob("*.png")):
        data = base64.b64encode(image.read_bytes()).decode("ascii")
        parts.append(f"<figure><img alt='{_e(image.name)}' src='data:image/png;base64,{data}'>"
                     f"<figcaption class=dim>{_e(image.name)}</figcaption></figure>")
    if len(parts) == 1:
        parts.append("<p>Nothing fastflat wrote was found here (no summary.json, no analysis result, no figure).</p>")
    return "".join(parts)


def _provenance(provenance: Any) -> str:
    if not isinstance(provenance, dict):
        return ""
    keys = ("device", "git_sha", "fastflat", "torch", "timestamp")
    return "<p class=dim>" + _e(", ".join(f"{k} {provenance[k]}" for k in keys if k in provenance)) + "</p>"


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header) if any(header) else ""
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table>{f'<tr>{head}</tr>' if head else ''}{body}</table>"


def _cell(value: Any) -> str:
    """Escaped text for a table cell: floats to 4 significant digits, None as '-'."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return _e(f"{value:.4g}")
    return _e(str(value))


def _e(text: str) -> str:
    return html.escape(text, quote=True)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    records = []
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return records
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line torn by a kill
        if isinstance(record, dict):
            records.append(record)
    return records
