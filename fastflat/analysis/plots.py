"""PNG figures of a run, drawn with matplotlib's file-only backend (no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import io

import matplotlib
import matplotlib.patheffects

from fastflat.runs.rundir import atomic_write_bytes

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def save_figure(fig: Any, path: Path) -> None:
    """Write the PNG whole or not at all (a full disk is one UserError line, the old figure intact)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=110, format="png")
    plt.close(fig)
    atomic_write_bytes(Path(path), buffer.getvalue())


def _values(history: list[dict[str, Any]], key: str) -> list[float]:
    """A metric per record; null (a non-finite value, see faults.json_safe) plots as a gap."""
    return [float("nan") if r.get(key) is None else r[key] for r in history]


def _broken_at_epochs(steps: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """A running mean restarts at every epoch: a gap (NaN) between epochs, so no line is drawn from one
    epoch's last value down to the next epoch's first."""
    import math

    xs: list[float] = []
    ys: list[float] = []
    last = None
    for record, value in zip(steps, _values(steps, key)):
        epoch = math.ceil(record["epoch"]) - 1  # the record at epoch 1.0 closes epoch 0
        if last is not None and epoch != last:
            xs.append(float("nan"))
            ys.append(float("nan"))
        xs.append(record["epoch"])
        ys.append(value)
        last = epoch
    return xs, ys


def plot_training_curves(history: list[dict[str, Any]], path: Path, title: str = "",
                         steps: list[dict[str, Any]] | None = None) -> None:
    """Loss, accuracy and learning rate against epochs: per-step lines (steps.jsonl, the epoch's running
    mean) under the per-epoch train/test/validation points; the LR panel shows SWA/SSE/FGE cycles."""
    if not history:
        return
    steps = steps or []
    epochs = [r["epoch"] for r in history]
    fig, (ax_loss, ax_acc, ax_lr) = plt.subplots(1, 3, figsize=(15, 4))
    for ax, key, label in ((ax_loss, "loss", "cross-entropy"), (ax_acc, "acc", "accuracy (%)")):
        if steps:
            xs, ys = _broken_at_epochs(steps, f"train_{key}")
            ax.plot(xs, ys, "-", color="C0", alpha=0.4, linewidth=1, label="train (running mean within the epoch)")
        ax.plot(epochs, _values(history, f"train_{key}"), "o", color="C0", label="train (epoch)")
        ax.plot(epochs, _values(history, f"test_{key}"), "s-", color="C1", label="test")
        if any(f"val_{key}" in r for r in history):
            ax.plot(epochs, _values(history, f"val_{key}"), "^-", color="C2", label="validation")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if steps:
        ax_lr.plot([r["epoch"] for r in steps], _values(steps, "lr"), "-", color="C3")
    else:
        ax_lr.plot(epochs, _values(history, "lr"), "o-", color="C3")
    ax_lr.set_xlabel("epoch")
    ax_lr.set_ylabel("learning rate")
    ax_lr.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)


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
    save_figure(fig, path)


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
    save_figure(fig, path)


def plot_spectral_density(results: list[dict[str, Any]], path: Path) -> None:
    """Each checkpoint's Hessian spectral density (SLQ, Gaussian-smoothed), log scale, on one figure."""
    from fastflat.analysis.sharpness import density_curve

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        t, p = density_curve(r["density"]["nodes"], r["density"]["weights"])
        # Far from every node the Gaussians underflow to 0 (or to rounding): leave a gap there rather
        # than draw a floor that looks like a measured plateau.
        p = p.masked_fill(p < p.max() * 1e-10, float("nan"))
        ax.semilogy(t.numpy(), p.numpy(), label=Path(r["checkpoint"]).name or r["checkpoint"])
    ax.set_xlabel("Hessian eigenvalue")
    ax.set_ylabel("density (SLQ)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


# -- loss-surface pictures (fastflat curve, fastflat landscape) --------------------------------------------
def plot_curve(report: dict[str, Any], path: Path) -> None:
    """Train loss and test error along the trained curve and along the straight segment."""
    ts = report["t"]
    fig, (ax_loss, ax_err) = plt.subplots(1, 2, figsize=(11, 4))
    for name, style in (("curve", "-"), ("line", "--")):
        p = report[name]
        label = f"{report['curve_kind']} curve" if name == "curve" else "straight segment"
        ax_loss.plot(ts, p["train_loss"], style, label=f"{label} (barrier {p['barrier']:.3g})")
        ax_err.plot(ts, p["test_err"], style, label=f"{label}: test error")
        if "ensemble_err" in p:
            ax_err.plot(ts, p["ensemble_err"], style, alpha=0.5, label=f"{label}: ensemble {{w1, point}}")
    ax_loss.set_ylabel("train loss")
    ax_err.set_ylabel("test error (%)")
    for ax in (ax_loss, ax_err):
        ax.set_xlabel("t")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"mode connectivity: {Path(report['run']).name}")
    fig.tight_layout()
    save_figure(fig, path)


def plot_plane(report: dict[str, Any], path: Path) -> None:
    """Contours of train loss (log levels) and test error over the plane, the three points marked, and
    a projected trajectory when there is one."""
    import numpy as np

    xs, ys = np.array(report["xs"]), np.array(report["ys"])
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    for ax, key, title in ((axes[0], "train_loss", "train loss"), (axes[1], "test_err", "test error (%)")):
        z = np.array(report[key])
        if key == "train_loss":
            levels = np.geomspace(max(z.min(), 1e-4), z.max(), 15)
            cs = ax.contourf(xs, ys, z, levels=levels, cmap="viridis", norm=matplotlib.colors.LogNorm())
        else:
            cs = ax.contourf(xs, ys, z, levels=15, cmap="viridis")
        fig.colorbar(cs, ax=ax, format="%.3g", label=title)
        for (x, y), name in zip(report["coords"], ("w1", "w2", "w3")):
            ax.plot(x, y, "w*", markersize=12, markeredgecolor="k")
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(6, 6), color="w",
                        path_effects=[matplotlib.patheffects.withStroke(linewidth=2, foreground="k")])
        if "trajectory" in report:
            tr = report["trajectory"]
            ax.plot(tr["x"], tr["y"], "r.-", markersize=3, linewidth=0.8, label="trajectory (projected)")
            ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14))  # under the axes, off the surface
        ax.set_aspect("equal", adjustable="box")  # both axes in weight units: distances read true
        ax.set_title(title)
        ax.set_xlabel("u (weight units)")
        ax.set_ylabel("v (weight units)")
    fig.tight_layout()
    save_figure(fig, path)


def plot_line(report: dict[str, Any], path: Path) -> None:
    """Train and test along w(t) = (1 - t) A + t B, past both ends; A (from) at t = 0, B (to) at t = 1."""
    ts = report["t"]
    fig, (ax_loss, ax_err) = plt.subplots(1, 2, figsize=(11, 4))
    for split, style in (("train", "-"), ("test", "--")):
        ax_loss.plot(ts, report[f"{split}_loss"], style, label=split)
        ax_err.plot(ts, report[f"{split}_err"], style, label=split)
    for ax, label in ((ax_loss, "loss"), (ax_err, "error (%)")):
        for t, name in ((0.0, Path(report["from"]).name), (1.0, Path(report["to"]).name)):
            ax.axvline(t, color="gray", alpha=0.5)
            ax.annotate(name, (t, ax.get_ylim()[1]), fontsize=7, rotation=90, va="top")
        ax.set_xlabel(f"t (distance between the points: {report['distance']:.3g})")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


def plot_rays(report: dict[str, Any], path: Path) -> None:
    """Train and test error against the distance along random directions, one colour per origin:
    the mean over directions, shaded from the best to the worst direction."""
    import numpy as np

    ts = report["t"]
    fig, (ax_train, ax_test) = plt.subplots(1, 2, figsize=(11, 4))
    for i, ray in enumerate(report["rays"]):
        for ax, key in ((ax_train, "train_err"), (ax_test, "test_err")):
            z = np.array(ray[key])  # (directions, points)
            ax.plot(ts, z.mean(0), color=f"C{i}", label=f"{Path(ray['at']).parent.name}/{Path(ray['at']).name}")
            ax.fill_between(ts, z.min(0), z.max(0), color=f"C{i}", alpha=0.2)
    unit = "filter-normalised units" if report["filter_normalised"] else "weight units"
    for ax, title in ((ax_train, "train error (%)"), (ax_test, "test error (%)")):
        ax.set_xlabel(f"distance along a random direction ({unit})")
        ax.set_ylabel(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def plot_soup(report: dict[str, Any], path: Path) -> None:
    """Test accuracy of each ingredient, the soups and the ensemble, as bars; labels under the axis."""
    names = [Path(i["run"]).name for i in report["ingredients"]]
    values = [i["test"]["acc"] for i in report["ingredients"]]
    colours = ["C0"] * len(names)
    for kind, colour in (("uniform", "C1"), ("greedy", "C2")):
        if kind in report:
            names.append(f"{kind} soup")
            values.append(report[kind]["test"]["acc"])
            colours.append(colour)
    names.append("ensemble")
    values.append(report["ensemble"]["test"]["acc"])
    colours.append("C3")
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(names)), 4))
    ax.bar(range(len(names)), values, color=colours)
    low = min(values)
    ax.set_ylim(low - max(0.5, 0.2 * (max(values) - low)), max(values) + 0.3)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set_xlabel("model")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3, axis="y")
    ax.set_title("model soups against their ingredients and their ensemble")
    fig.tight_layout()
    save_figure(fig, path)
