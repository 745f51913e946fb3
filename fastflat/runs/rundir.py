"""A run directory: config.yaml, metrics.jsonl, checkpoint.pt (atomic), summary.json, figures.

Every file a run writes is written whole or not at all (temp file, fsync, os.replace), so a crash
never leaves a half checkpoint, and a new run never reuses a directory that already holds one. A
write that fails (disk full, read-only) is one UserError line; the previous file stays intact.
One process at a time trains a run (an advisory lock, released by the OS even on SIGKILL).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import io
import json
import math
import os
import platform
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import yaml

from fastflat.errors import UserError, finite_state_or_raise

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = "fastflat-checkpoint/1"
CHECKPOINT_KEYS = ("config", "model", "method", "position", "rng_cpu")
LOCK = ".lock"
TEMPORARY = ".*.tmp"  # what atomic_write_bytes names its temporary files


def json_safe(value: Any) -> Any:
    """NaN and +-inf become None, recursively, so metrics and summaries stay strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def _cannot_write(path: Path, error: OSError) -> UserError:
    return UserError(f"cannot write {path}: {error.strerror or error}; files already there are intact")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise _cannot_write(path, e) from None
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600: give the file what open() would, as umask says
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise _cannot_write(path, e) from None
        raise


def _umask() -> int:
    """The process's umask (read by setting it, so set it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def git_sha() -> str | None:
    """The commit of the fastflat source tree (with '-dirty' if it has local changes), if it is a repo;
    else $FASTFLAT_GIT_SHA, for a copy of the package run outside its checkout (e.g. so that long
    experiments are safe from edits to the working tree); else None."""
    return _repo_sha() or os.environ.get("FASTFLAT_GIT_SHA") or None


def _repo_sha() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return sha + ("-dirty" if dirty else "")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU ({os.cpu_count()} cores)"


def provenance(device: torch.device) -> dict[str, Any]:
    """What a result needs to be trusted later: code version, library versions, hardware, time."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    import torchvision

    from fastflat.version import __version__

    return {
        "git_sha": git_sha(),
        "fastflat": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "triton": triton_version,
        "device": device_name(device),
        "host": platform.node(),
        "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


class RunDir:
    """The folder of one run. `create` makes a new one; `open` an existing one (resume, eval).

    In a distributed job every rank holds a RunDir for the same path, but only rank 0 (writes=True)
    touches the disk: the others' writes are no-ops, so there is one copy of every file, not one per rank.
    """

    def __init__(self, path: Path, writes: bool = True):
        self.path = Path(path)
        self.writes = writes

    @classmethod
    def create(cls, parent: str | Path, name: str, rank: int = 0) -> RunDir:
        parent = Path(parent)
        if rank != 0:  # rank 0 names and makes the directory; the job passes that name to the others
            return cls(parent / name, writes=False)
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create run directory {parent / name}: {e.strerror}") from None
        path, suffix = parent / name, 1
        while True:  # never write into an existing run: the first free NAME, NAME-2, ... (mkdir is atomic,
            try:     # so two runs started at the same moment with one --name take different ones)
                path.mkdir()
                break
            except FileExistsError:
                suffix += 1
                path = parent / f"{name}-{suffix}"
            except OSError as e:
                raise UserError(f"cannot create run directory {path}: {e.strerror}") from None
        return cls(path)

    @classmethod
    def open(cls, path: str | Path, rank: int = 0) -> RunDir:
        path = Path(path)
        if not (path / CHECKPOINT).is_file():
            raise UserError(f"{path} is not a run directory with a {CHECKPOINT}; pass the folder a run wrote")
        return cls(path, writes=rank == 0)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the run's lock; a second process asking for it gets one UserError line."""
        if not self.writes:
            yield
            return
        try:
            fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(f"cannot write in run directory {self.path}: {e.strerror}") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise UserError(f"run {self.path} is being trained by another fastflat process; "
                                f"wait for it to end (or stop it) before resuming") from None
            yield
            if (self.path / "summary.json").is_file():  # finished: no lock file left behind in the results
                (self.path / LOCK).unlink(missing_ok=True)
        finally:
            os.close(fd)  # closing releases the lock

    def remove_temporaries(self) -> None:
        """Delete the temporary files of writes that a crash cut short (call while holding the lock)."""
        if not self.writes:
            return
        for folder in (self.path, self.path / "members", self.path / "trajectory"):
            for tmp in folder.glob(TEMPORARY):
                tmp.unlink(missing_ok=True)

    def remove_if_unused(self) -> None:
        """After a failed start: remove the directory if it holds nothing but its config and lock."""
        if not self.writes:
            return
        if {p.name for p in self.path.iterdir()} <= {"config.yaml", LOCK}:
            for p in self.path.iterdir():
                p.unlink()
            self.path.rmdir()

    @property
    def checkpoint_path(self) -> Path:
        return self.path / CHECKPOINT

    def write_config(self, config: dict[str, Any]) -> None:
        if not self.writes:
            return
        atomic_write_text(self.path / "config.yaml", yaml.safe_dump(config, sort_keys=False))

    def write_text(self, name: str, text: str) -> None:
        """A small text file of the run (atomically), e.g. the images --bad-images skip left out."""
        if self.writes:
            atomic_write_text(self.path / name, text)

    def append_metrics(self, record: dict[str, Any], name: str = "metrics.jsonl") -> None:
        if not self.writes:
            return
        line = json.dumps(json_safe(record), allow_nan=False) + "\n"  # NaN/inf become null: strict JSON
        try:
            with open(self.path / name, "a") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise _cannot_write(self.path / name, e) from None

    def write_csv(self, name: str = "metrics.jsonl") -> None:
        """<name>.csv beside a .jsonl log (one column per key, in first-seen order), rewritten whole."""
        records = self.read_metrics(name) if self.writes else []
        if not records:
            return
        import csv

        columns = list(dict.fromkeys(k for r in records for k in r))
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(records)
        atomic_write_text(self.path / name.replace(".jsonl", ".csv"), buffer.getvalue())

    def open_tensorboard(self, purge_step: int | None) -> None:
        """TensorBoard scalars in tensorboard/; a resumed run drops the events past its checkpoint."""
        if not self.writes:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError("--tensorboard needs the tensorboard package: pip install 'fastflat[tensorboard]'") from None
        self._tensorboard = SummaryWriter(str(self.path / "tensorboard"), purge_step=purge_step)

    def log_scalars(self, record: dict[str, Any], kind: str) -> None:
        board = getattr(self, "_tensorboard", None)
        if board is None:
            return
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                board.add_scalar(f"{kind}/{key}", value, record["step"])
        board.flush()

    def close_tensorboard(self) -> None:
        board = getattr(self, "_tensorboard", None)
        if board is not None:
            board.close()
            self._tensorboard = None

    def log_sizes(self) -> dict[str, int]:
        """Bytes in each .jsonl log now: a checkpoint keeps these, and resume cuts the logs back to them."""
        return {p.name: p.stat().st_size for p in self.path.glob("*.jsonl")}

    def truncate_logs(self, sizes: dict[str, int]) -> None:
        """Drop what was appended after the checkpoint (a line, or half of one, from a killed run)."""
        if not self.writes:
            return
        for path in self.path.glob("*.jsonl"):
            keep = sizes.get(path.name, 0)
            if path.stat().st_size > keep:
                try:
                    os.truncate(path, keep)
                except OSError as e:
                    raise _cannot_write(path, e) from None

    def read_metrics(self, name: str = "metrics.jsonl") -> list[dict[str, Any]]:
        path = self.path / name
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def truncate_metrics(self, keep_until_step: int) -> None:
        """On resume: drop records written after the checkpoint, so every log matches the state."""
        for path in self.path.glob("*.jsonl"):
            kept = [r for r in self.read_metrics(path.name) if r.get("step", 0) <= keep_until_step]
            atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        if not self.writes:
            return
        buffer = io.BytesIO()
        torch.save({"format": CHECKPOINT_FORMAT, **state}, buffer)
        atomic_write_bytes(self.checkpoint_path, buffer.getvalue())

    def save_member(self, tag: str, state_dict: dict[str, Any]) -> Path:
        """An ensemble member (or averaged model) as a plain state_dict in members/<tag>.pt."""
        folder = self.path / "members"
        if not self.writes:
            return folder / f"{tag}.pt"
        folder.mkdir(exist_ok=True)
        buffer = io.BytesIO()
        torch.save({k: v.detach().clone() for k, v in state_dict.items()}, buffer)
        path = folder / f"{tag}.pt"
        atomic_write_bytes(path, buffer.getvalue())
        return path

    def save_trajectory_point(self, step: int, weights: torch.Tensor) -> None:
        """The (N,) weights after `step` steps, as trajectory/step-<step>.pt (a resumed run rewrites the same)."""
        if not self.writes:
            return
        folder = self.path / "trajectory"
        folder.mkdir(exist_ok=True)
        buffer = io.BytesIO()
        torch.save({"step": step, "weights": weights.detach().to("cpu", torch.float32).clone()}, buffer)
        atomic_write_bytes(folder / f"step-{step:09d}.pt", buffer.getvalue())

    def mark_failed(self, error: BaseException) -> None:
        """failed.json: why the run stopped (fastflat runs shows it; a resume clears it)."""
        if self.writes:
            record = {"error": str(error).splitlines()[0] if str(error) else type(error).__name__,
                      "type": type(error).__name__}
            atomic_write_text(self.path / "failed.json", json.dumps(record) + "\n")

    def clear_failed(self) -> None:
        if self.writes:
            (self.path / "failed.json").unlink(missing_ok=True)

    def write_summary(self, summary: dict[str, Any]) -> None:
        if not self.writes:
            return
        atomic_write_text(self.path / "summary.json", json.dumps(json_safe(summary), indent=2, allow_nan=False) + "\n")


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint file (or a run directory's), or raise UserError saying what is wrong."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # never unpickle code
    except Exception as e:  # torch raises many types for a truncated or foreign file
        raise UserError(f"checkpoint {path} is unreadable ({type(e).__name__}); it may be truncated or not a fastflat checkpoint") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"checkpoint {path} is not a {CHECKPOINT_FORMAT} file")
    missing = [k for k in CHECKPOINT_KEYS if k not in state]
    if missing or not isinstance(state["config"], dict) or not isinstance(state["model"], dict):
        what = f"lacks {', '.join(missing)}" if missing else "has a malformed config or model entry"
        raise UserError(f"checkpoint {path} {what}; it is damaged or was not written by fastflat")
    return state


def load_weights(model: torch.nn.Module, state_dict: dict[str, Any], source: str, model_name: str) -> None:
    """model.load_state_dict, with a mismatch (another architecture, missing keys) as one UserError line."""
    try:
        model.load_state_dict(state_dict)
    except (RuntimeError, KeyError, TypeError, AttributeError) as e:
        first = str(e).strip().splitlines()
        detail = first[1].strip() if len(first) > 1 else (first[0] if first else type(e).__name__)
        raise UserError(f"{source} does not fit model {model_name}: {detail}") from None


def load_point(path: str | Path) -> dict[str, Any]:
    """A point in weight space: a run directory or checkpoint (its current weights), or a member file
    RUN/members/<tag>.pt (an average, a snapshot, a curve's bend) with its run's config. Returns the
    checkpoint's keys, "model" holding the point's state_dict. Weights or buffers holding NaN or inf are
    a NonFiniteError (exit 3) naming them: nothing is scored from them."""
    path = Path(path)
    if path.is_file() and path.parent.name == "members":
        state = load_checkpoint(path.parent.parent)
        try:
            weights = torch.load(path, map_location="cpu", weights_only=True)  # never unpickle code
        except Exception as e:
            raise UserError(f"member file {path} is unreadable ({type(e).__name__}); it may be truncated") from None
        if not isinstance(weights, dict):
            raise UserError(f"member file {path} holds no state_dict")
        finite_state_or_raise(weights, f"member file {path}")
        return {**state, "model": weights}
    state = load_checkpoint(path)
    finite_state_or_raise(state["model"], f"checkpoint {path}")
    return state
