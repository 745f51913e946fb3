"""PNG figures of a run, drawn with matplotlib's file-only backend (no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import io

import matplotlib

from fastflat.rundir import atomic_write_bytes

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _save(fig: Any, path: Path) -> None:
    """Write the PNG whole or not at all (a full disk is one UserError line, the old figure intact)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=110, format="png")
    plt.close(fig)
    atomic_write_bytes(Path(path), buffer.getvalue())


def _values(history: list[dict[str, Any]], key: str) -> list[float]:
    """A metric per record; null (a non-finite value, see faults.json_safe) plots as a gap."""
    return [float("nan") if r.get(key) is None else r[key] for r in history]


def plot_training_curves(history: list[dict[str, Any]], path: Path, title: str = "") -> None:
    """Loss and accuracy per epoch, train against test, side by side."""
    if not history:
        return
    epochs = [r["epoch"] for r in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((ax_loss, "loss", "cross-entropy"), (ax_acc, "acc", "accuracy (%)")):
        ax.plot(epochs, _values(history, f"train_{key}"), "o-", label="train")
        ax.plot(epochs, _values(history, f"test_{key}"), "s-", label="test")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)


def plot_ensemble_curve(report: dict[str, Any], path: Path) -> None:
    """Ensemble accuracy as members are added, against each member alone."""
    sizes = list(range(1, len(report["accuracy_by_size"]) + 1))
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(sizes, report["accuracy_by_size"], "o-", label="ensemble of the first k")
    ax.plot(sizes, [m["acc"] for m in report["members"]], "s--", alpha=0.7, label="member k alone")
    ax.set_xlabel("members (k)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_xticks(sizes)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"{report['kind']} ensemble")
    fig.tight_layout()
    _save(fig, path)


def plot_budget_view(report: dict[str, Any], path: Path) -> None:
    """Test error against budget (multiples of B epochs), one line per method, best member dashed."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for kind, row in report["rows"].items():
        budgets = sorted(int(k) for k in row)
        line, = ax.plot(budgets, [row[k]["error"] for k in budgets], "o-", label=f"{kind} ensemble")
        ax.plot(budgets, [row[k]["best_member_error"] for k in budgets], "x--", color=line.get_color(),
                alpha=0.6, label=f"{kind} best member")
    ax.set_xticks(sorted({int(k) for row in report["rows"].values() for k in row}))
    ax.set_xlabel(f"budget (multiples of B = {report['budget_epochs']} epochs)")
    ax.set_ylabel("test error (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("error at equal training budget")
    fig.tight_layout()
    _save(fig, path)


def plot_spectral_density(results: list[dict[str, Any]], path: Path) -> None:
    """Each checkpoint's Hessian spectral density (SLQ, Gaussian-smoothed), log scale, on one figure."""
    from fastflat.sharpness import density_curve

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        t, p = density_curve(r["density"]["nodes"], r["density"]["weights"])
        ax.semilogy(t.numpy(), p.clamp_min(1e-12).numpy(), label=Path(r["checkpoint"]).name or r["checkpoint"])
    ax.set_xlabel("Hessian eigenvalue")
    ax.set_ylabel("density (SLQ)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    _save(fig, path)
