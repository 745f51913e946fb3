"""Run management: the runs in a folder (`fastflat runs`), the run `--resume auto` picks, what a new run
is named, whether a run may be extended, and whether it can run across ranks.

A run's status comes from its files: summary.json (finished), failed.json (stopped by an error, e.g.
non-finite losses), a held lock (being trained now), else a checkpoint to resume (interrupted).
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from fastflat.errors import UserError
from fastflat.runs.rundir import CHECKPOINT, LOCK

if TYPE_CHECKING:  # annotations only: the config is assembled above the methods
    from fastflat.config import TrainConfig


def status(run: Path) -> str:
    if (run / "summary.json").is_file():
        return "cut short" if _cut_short(run) else "finished"
    if (run / "failed.json").is_file():
        return "failed"
    if _locked(run):
        return "running"
    return "interrupted" if (run / CHECKPOINT).is_file() else "not started"


def _cut_short(run: Path) -> bool:
    """A finished run stopped by --max-steps before the steps its schedule planned."""
    try:
        summary = json.loads((run / "summary.json").read_text())
        return summary["steps"] < summary["planned_steps"]
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _locked(run: Path) -> bool:
    if not (run / LOCK).exists():
        return False
    try:
        fd = os.open(run / LOCK, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # releases the lock if we took it


def _read_config(run: Path) -> dict[str, Any]:
    """config.yaml as a mapping; ValueError saying why it is not one."""
    try:
        config = yaml.safe_load((run / "config.yaml").read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise ValueError("config.yaml is not text") from None
    except yaml.YAMLError as e:
        raise ValueError(f"config.yaml is not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(config, dict):
        raise ValueError(f"config.yaml holds a {type(config).__name__}, not a mapping of settings")
    return config


def _read_records(run: Path) -> list[dict[str, Any]]:
    """The epoch records of metrics.jsonl; a line torn by a kill is skipped (resume cuts it), a line that
    is JSON but no epoch record is a ValueError naming it."""
    records = []
    metrics = run / "metrics.jsonl"
    if not metrics.is_file():
        return records
    try:
        lines = metrics.read_bytes().decode("utf-8").splitlines()
    except UnicodeDecodeError:
        raise ValueError("metrics.jsonl is not text") from None
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(record, dict) or not isinstance(record.get("epoch"), (int, float)):
            raise ValueError(f"metrics.jsonl line {number} is not an epoch record")
        records.append(record)
    return records


def describe(run: Path) -> dict[str, Any]:
    """One row: method, model, data, epochs done of planned, best/final test accuracy, status; a run whose
    files cannot be read is the row of an "unreadable" run, with the reason in "error"."""
    modified = max((p.stat().st_mtime for p in run.iterdir()), default=run.stat().st_mtime)
    try:
        config, records = _read_config(run), _read_records(run)
    except (OSError, ValueError) as e:
        return {"run": run.name, "path": str(run), "method": None, "model": None, "dataset": None, "epochs_done": 0,
                "epochs": None, "best_test_acc": None, "final_test_acc": None, "status": "unreadable",
                "error": str(e), "modified": modified}
    scored = [r["test_acc"] for r in records if isinstance(r.get("test_acc"), (int, float))]
    row = {"run": run.name, "path": str(run), "method": config.get("method"), "model": config.get("model"),
           "dataset": config.get("dataset"), "epochs_done": records[-1]["epoch"] if records else 0,
           "epochs": config.get("epochs"), "best_test_acc": max(scored) if scored else None,
           "final_test_acc": scored[-1] if scored else None, "status": status(run), "modified": modified}
    if row["status"] == "failed":
        try:
            row["error"] = json.loads((run / "failed.json").read_text()).get("error")
        except (OSError, ValueError, AttributeError):
            row["error"] = "failed.json is unreadable"
    return row


def list_runs(folder: str | Path) -> list[dict[str, Any]]:
    """Every run directory directly in `folder` (one holding config.yaml), oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder of runs (train writes them under --out, default runs/)")
    rows = [describe(p) for p in folder.iterdir() if (p / "config.yaml").is_file()]
    return sorted(rows, key=lambda r: r["modified"])


def latest_resumable(folder: str | Path, name: str | None = None) -> Path:
    """--resume auto: the most recently written interrupted or failed run in `folder` (of run name `name`
    or its numbered repeats `name-2`, `name-3`, ... when given)."""
    def named(run: str) -> bool:
        return name is None or run == name or (run.startswith(f"{name}-") and run[len(name) + 1:].isdigit())

    candidates = [r for r in list_runs(folder) if named(r["run"]) and r["status"] in ("interrupted", "failed")]
    if not candidates:
        which = f" named {name}" if name else ""
        raise UserError(f"--resume auto: no interrupted run{which} in {folder} (fastflat runs {folder} lists them)")
    return Path(candidates[-1]["path"])


def default_run_name(cfg: TrainConfig) -> str:
    """method-data-model-seed-time; a folder:PATH dataset is named by its last folder, and anything
    that cannot sit in a file name (':' of torchvision:NAME, '/') becomes '-'."""
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    data = f"folder-{Path(cfg.dataset[len('folder:'):]).name}" if cfg.dataset.startswith("folder:") else cfg.dataset
    model = cfg.model.removeprefix("custom:")  # fastflat.train(model=...): its class name, once (not custom-custom-)
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{cfg.method}-{data}-{model}-s{cfg.seed}-{stamp}")
