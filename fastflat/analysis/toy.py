"""2-D test functions and optimizer trajectories, with and without SAM: the SAM talk's teaching picture.

    report = run_toy("easom", "sgd", starts=4, rho=0.3)     # trajectories, end points, global minimum hit
    plot_toy(report, "toy.png")

Each function is written once with its known global minimum; the optimizers are torch's own
(SGD, Adagrad, Adam), wrapped by fastflat.SAM for the SAM trajectories, from the same seeded starts.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fastflat.errors import UserError
from fastflat.optim import SAM


@dataclass(frozen=True)
class Surface:
    f: Callable[[Tensor, Tensor], Tensor]
    domain: tuple[float, float, float, float]  # x_min, x_max, y_min, y_max: starts and plot
    argmin: tuple[float, float]
    minimum: float
    lr: float  # a step size that moves on this surface without blowing up


def _easom(x: Tensor, y: Tensor) -> Tensor:  # -1 at (pi, pi), flat almost everywhere else
    return -torch.cos(x) * torch.cos(y) * torch.exp(-((x - math.pi) ** 2 + (y - math.pi) ** 2))


def _eggholder(x: Tensor, y: Tensor) -> Tensor:  # -959.6407 at (512, 404.2319), many deep local minima
    return -(y + 47) * torch.sin(torch.sqrt((x / 2 + y + 47).abs())) - x * torch.sin(torch.sqrt((x - (y + 47)).abs()))


def _rastrigin(x: Tensor, y: Tensor) -> Tensor:  # 0 at the origin, a regular grid of local minima
    return 20 + x**2 - 10 * torch.cos(2 * math.pi * x) + y**2 - 10 * torch.cos(2 * math.pi * y)


def _rosenbrock(x: Tensor, y: Tensor) -> Tensor:  # 0 at (1, 1), at the end of a curved flat valley
    return (1 - x) ** 2 + 100 * (y - x**2) ** 2


SURFACES = {
    "easom": Surface(_easom, (0.0, 6.0, 0.0, 6.0), (math.pi, math.pi), -1.0, 0.5),
    "eggholder": Surface(_eggholder, (-512.0, 512.0, -512.0, 512.0), (512.0, 404.2319), -959.6407, 2.0),
    "rastrigin": Surface(_rastrigin, (-5.12, 5.12, -5.12, 5.12), (0.0, 0.0), 0.0, 0.01),
    "rosenbrock": Surface(_rosenbrock, (-2.0, 2.0, -1.0, 3.0), (1.0, 1.0), 0.0, 1e-3),
}
OPTIMIZERS = {"sgd": torch.optim.SGD, "adagrad": torch.optim.Adagrad, "adam": torch.optim.Adam}


def surface(name: str) -> Surface:
    if name not in SURFACES:
        raise UserError(f"unknown function {name!r}; choose one of: {', '.join(SURFACES)}")
    return SURFACES[name]


def trajectory(s: Surface, start: tuple[float, float], optimizer: str, lr: float, steps: int,
               rho: float | None) -> list[tuple[float, float]]:
    """The points an optimizer visits from `start`; with rho, SAM around it (ascent step rho)."""
    p = torch.tensor(start, dtype=torch.float64, requires_grad=True)
    opt_cls = OPTIMIZERS[optimizer]
    opt = SAM([p], opt_cls, rho=rho, lr=lr) if rho else opt_cls([p], lr=lr)
    points = [tuple(p.tolist())]

    def loss() -> Tensor:
        return s.f(p[0], p[1])

    for _ in range(steps):
        opt.zero_grad()
        loss().backward()
        if rho:
            opt.first_step(zero_grad=True)
            loss().backward()
            opt.second_step(zero_grad=True)
        else:
            opt.step()
        if not torch.isfinite(p).all():
            break  # diverged: the trajectory ends where it was last finite
        points.append(tuple(p.tolist()))
    return points


def run_toy(name: str, optimizer: str = "sgd", starts: int = 4, rho: float = 0.3, steps: int = 300,
            lr: float | None = None, seed: int = 0) -> dict[str, Any]:
    """Trajectories of `optimizer` with and without SAM from the same `starts` seeded start points."""
    s = surface(name)
    if optimizer not in OPTIMIZERS:
        raise UserError(f"unknown optimizer {optimizer!r}; choose one of: {', '.join(OPTIMIZERS)}")
    if rho <= 0 or starts < 1 or steps < 1:
        raise UserError(f"--rho must be > 0, --starts and --steps >= 1 (got {rho}, {starts}, {steps})")
    g = torch.Generator().manual_seed(seed)
    x0, x1, y0, y1 = s.domain
    corners = torch.rand(starts, 2, generator=g, dtype=torch.float64)
    points = [(x0 + (x1 - x0) * float(a), y0 + (y1 - y0) * float(b)) for a, b in corners]
    tolerance = 0.01 * max(x1 - x0, y1 - y0)  # "reached the global minimum": within 1% of the domain
    runs = []
    for start in points:
        for label, r in (("plain", None), ("sam", rho)):
            path = trajectory(s, start, optimizer, lr or s.lr, steps, r)
            end = path[-1]
            value = float(s.f(torch.tensor(end[0]), torch.tensor(end[1])))
            runs.append({"start": start, "kind": label, "end": end, "value": value, "steps": len(path) - 1,
                         "global_min": math.dist(end, s.argmin) <= tolerance, "path": path})
    return {"function": name, "optimizer": optimizer, "rho": rho, "lr": lr or s.lr, "steps": steps,
            "argmin": s.argmin, "minimum": s.minimum, "runs": runs}


def plot_toy(report: dict[str, Any], path: str | Path) -> None:
    """Contours of the function with each trajectory (plain solid, SAM dashed), start dots, end crosses:
    on the whole domain (left) and zoomed onto the trajectories (right), where steps of a few pixels on
    the whole domain can be told apart. The legend sits under the panels, off the data."""
    import matplotlib.pyplot as plt

    from fastflat.analysis.plots import save_figure

    s = surface(report["function"])
    x0, x1, y0, y1 = s.domain
    px_all = [x for run in report["runs"] for x, _ in run["path"]]
    py_all = [y for run in report["runs"] for _, y in run["path"]]
    pad = 0.1 * max(max(px_all) - min(px_all), max(py_all) - min(py_all), 1e-3 * (x1 - x0))
    zoom = (max(x0, min(px_all) - pad), min(x1, max(px_all) + pad), max(y0, min(py_all) - pad), min(y1, max(py_all) + pad))
    fig, axes = plt.subplots(1, 2, figsize=(13, 6.5))
    for ax, (a0, a1, b0, b1), where in ((axes[0], s.domain, "whole domain"), (axes[1], zoom, "around the trajectories")):
        xs, ys = torch.meshgrid(torch.linspace(a0, a1, 300), torch.linspace(b0, b1, 300), indexing="xy")
        contour = ax.contourf(xs, ys, s.f(xs, ys), levels=40, cmap="viridis")
        fig.colorbar(contour, ax=ax, label=f"{report['function']}(x, y)")
        for i, run in enumerate(report["runs"]):
            px, py = zip(*run["path"])
            color = f"C{(i // 2) % 10}"
            ax.plot(px, py, "--" if run["kind"] == "sam" else "-", color=color, lw=1.5,
                    label=f"start {i // 2 + 1} {'SAM' if run['kind'] == 'sam' else report['optimizer']}")
            ax.plot(px[0], py[0], "o", color=color)
            ax.plot(px[-1], py[-1], "x", color=color, ms=9)
        ax.plot(*s.argmin, "*", color="red", ms=14, label="global minimum")
        ax.set_xlim(a0, a1)
        ax.set_ylim(b0, b1)
        ax.set_xlabel("x")
        ax.set_ylabel("y")
        ax.set_title(where)
    fig.suptitle(f"{report['function']}: {report['optimizer']} (solid) vs SAM rho={report['rho']} (dashed); "
                 "o start, x end")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=min(len(labels), 5))
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    save_figure(fig, Path(path))
