"""Loss-surface geometry: planes through three solutions, lines, random rays, and curves' paths.

    report = plane(["runs/a", "runs/b", "runs/c"], grid=21, examples=2048, out=Path("plane"))

Every picture is a set of points in weight space, each scored by points.PointScorer (BatchNorm
re-estimated per point) and cached one JSON line per point, so a killed grid resumes where it stopped.
Coordinates are in weight units (Euclidean distance), except rays along filter-normalised directions.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fastflat.errors import UserError
from fastflat.geometry.points import PointScorer, WeightSpace

Progress = Callable[[int, int], None]  # (points done, points in all)


# -- loading points ----------------------------------------------------------------------------------------
def load_points(paths: list[str | Path], device: str = "auto", data_dir: str | None = None):
    """(config, dataset, WeightSpace, [(N,) vector per path]) for runs or member files of one model and
    dataset (the first one's label noise and seed)."""
    from fastflat.config import to_dict
    from fastflat.load import load_shared
    from fastflat.runs.rundir import load_weights

    shared = load_shared(paths, device, data_dir)
    states, data, model = shared.states, shared.data, shared.model
    config = to_dict(shared.config)
    space = WeightSpace(model)
    vectors = [space.vector_of(s["model"], lambda m, sd, p=p: load_weights(m, sd, f"weights {p}", config["model"]))
               for p, s in zip(paths, states)]
    return config, data, space, vectors


# -- a grid of points, cached per point ----------------------------------------------------------------------
BN_RULE = "exact"  # BatchNorm recomputed over the examples (in the cache key: points scored under torch's rule differ)
NAMES_NOT_CONTENT = ("paths", "from", "to", "run", "origin")  # file names in a spec: the cache keys on content


def content_of(config: dict[str, Any], *vectors: Tensor) -> dict[str, Any]:
    """What a point's scores depend on besides the grid settings: the weights that define it (a SHA-256 of
    their bytes, so a run's weights replaced at the same path are scored afresh) and the data."""
    digest = hashlib.sha256()
    for v in vectors:
        digest.update(v.detach().contiguous().cpu().numpy().tobytes())
    return {"weights": digest.hexdigest(), "data": [config["dataset"], config["label_noise"], config["seed"],
                                                    config.get("image_size")]}


def score_points(scorer: PointScorer, count: int, vector_at: Callable[[int], Tensor], spec: dict[str, Any],
                 cache_dir: Path | None, points_at_once: int = 1, progress: Progress | None = None) -> list[dict[str, float]]:
    """Score points 0..count-1 (vector_at(i) builds the (N,) weights). With `cache_dir`, each scored point
    is appended to a cache file named by `spec`'s content (the grid settings and content_of the weights and
    data, never a file name), so a rerun skips the points still valid and only those."""
    done: dict[int, dict[str, float]] = {}
    cache = None
    if cache_dir is not None:
        defining = {k: v for k, v in spec.items() if k not in NAMES_NOT_CONTENT}  # where the weights came from: no
        key = hashlib.sha256(json.dumps(defining, sort_keys=True, default=str).encode()).hexdigest()[:16]
        cache = cache_dir / f".points-{key}.jsonl"
        cache_dir.mkdir(parents=True, exist_ok=True)
        done = _read_cache(cache)
    todo = [i for i in range(count) if i not in done]
    if progress:
        progress(count - len(todo), count)
    for start in range(0, len(todo), max(points_at_once, 1)):
        chunk = todo[start : start + max(points_at_once, 1)]
        if points_at_once > 1:
            rows = scorer.score_batched(torch.stack([vector_at(i) for i in chunk]))
        else:
            rows = [scorer.score_one(vector_at(i)) for i in chunk]
        for i, row in zip(chunk, rows):
            done[i] = row
        if cache is not None:
            _append_to_cache(cache, [{"i": i, **row} for i, row in zip(chunk, rows)], len(done), count)
        if progress:
            progress(count - len(todo) + start + len(chunk), count)
    return [done[i] for i in range(count)]


def _append_to_cache(cache: Path, rows: list[dict[str, Any]], done: int, count: int) -> None:
    """Append scored points, fsynced; a full disk or a read-only folder is one UserError line (the points
    cached so far stay valid: a rerun with the same settings continues from them)."""
    try:
        with open(cache, "a") as f:
            f.write("".join(json.dumps(row) + "\n" for row in rows))
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise UserError(f"cannot write the point cache {cache}: {e.strerror or e}; {done} of {count} points were "
                        "scored, those cached before stay valid: free space and rerun the same command") from None


def _read_cache(path: Path) -> dict[int, dict[str, float]]:
    """Points already scored; a line cut short by a kill (the last one) is ignored and scored again."""
    done = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            done[int(row.pop("i"))] = row
    return done


# -- geometry ------------------------------------------------------------------------------------------------
def plane_basis(w1: Tensor, w2: Tensor, w3: Tensor) -> tuple[Tensor, Tensor]:
    """Orthonormal (u^, v^) of the plane through three points: u = w2 - w1, v = (w3 - w1) minus its
    projection on u (Gram-Schmidt, in fp64). Collinear or coincident points: UserError."""
    u = w2.double() - w1.double()  # differences in fp64: fp32 ones would put w2 ~1e-9 off its own axis
    d3 = w3.double() - w1.double()
    if u.norm() == 0:
        raise UserError("the first two points are the same weights: a plane needs three distinct points")
    v = d3 - (d3 @ u) / (u @ u) * u
    if d3.norm() == 0 or v.norm() <= 1e-6 * d3.norm():
        raise UserError("the three points are collinear (the third lies on the line through the first two): "
                        "no plane passes through them alone")
    return u / u.norm(), v / v.norm()


def project(points: Tensor, origin: Tensor, u: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(K, N) points -> their plane coordinates x, y (K,) and distance off the plane (K,), in fp64."""
    d = points.double() - origin.double()
    x, y = d @ u, d @ v
    off = (d - x[:, None] * u - y[:, None] * v).norm(dim=1)
    return x, y, off


def grid_axis(values: list[float], points: int, margin: float, span: float | None = None) -> list[float]:
    """`points` evenly spaced coordinates covering `values` with `margin` x `span` (default: their own
    span) on each side. The plane passes the larger of its two spans, so points nearly on one line still
    get a second axis wide enough to see the surface around them."""
    lo, hi = min(values), max(values)
    pad = margin * (hi - lo if span is None else span)
    lo, hi = lo - pad, hi + pad
    return [lo + (hi - lo) * i / (points - 1) for i in range(points)]


def random_directions(space: WeightSpace, count: int, seed: int, filter_norm: bool, at: Tensor) -> list[Tensor]:
    """`count` Gaussian directions (fixed by seed): unit length; or filter-normalised (Li et al. 2018): each
    output filter scaled to the norm of that filter of `at`, biases and 1-D parameters (BatchNorm) zero."""
    generator = torch.Generator().manual_seed(seed)
    directions = []
    for _ in range(count):
        d = torch.randn(space.numel, generator=generator, dtype=torch.float64).to(at.device)
        if filter_norm:
            for offset, shape in space.layout.values():
                part = d[offset : offset + shape.numel()]
                if len(shape) <= 1:
                    part.zero_()
                    continue
                rows, w = part.view(shape[0], -1), at[offset : offset + shape.numel()].double().view(shape[0], -1)
                rows.mul_(w.norm(dim=1, keepdim=True) / rows.norm(dim=1, keepdim=True).clamp(min=1e-12))
        else:
            d /= d.norm()
        directions.append(d.to(at.dtype))
    return directions


# -- path summaries ------------------------------------------------------------------------------------------
def barrier(ts: list[float], losses: list[float]) -> float:
    """Max loss along a path minus the mean of its end points' losses (ts from 0 to 1)."""
    return max(losses) - (losses[0] + losses[-1]) / 2


def path_integral(ts: list[float], losses: list[float]) -> float:
    """Mean loss along the path: the trapezoid integral of the loss over t in [0, 1]."""
    return sum((ts[i + 1] - ts[i]) * (losses[i] + losses[i + 1]) / 2 for i in range(len(ts) - 1))


# -- the pictures --------------------------------------------------------------------------------------------
def _scorer(space: WeightSpace, data, examples: int, seed: int, bn_update: bool, **kw) -> PointScorer:
    if examples > len(data.train):
        raise UserError(f"--examples {examples} is larger than the {len(data.train)} training examples")
    return PointScorer(space, data, examples, seed, bn_update, **kw)


def _columns(rows: list[dict[str, float]], shape: tuple[int, ...] | None = None) -> dict[str, Any]:
    """Rows of metrics -> {metric: list (nested to `shape`)}."""
    out = {}
    for key in rows[0]:
        values = torch.tensor([r[key] for r in rows], dtype=torch.float64)
        out[key] = (values.view(*shape) if shape else values).tolist()
    return out


def plane(paths: list[str], grid: int = 11, margin: float = 0.2, examples: int = 0, seed: int = 0,
          bn_update: bool = True, trajectory: str | None = None, points_at_once: int = 1, device: str = "auto",
          data_dir: str | None = None, cache_dir: Path | None = None, progress: Progress | None = None,
          warn: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train loss and test error over the plane through three points, P(x, y) = w1 + x u^ + y v^.

    The grid spans the three points and the projected trajectory (when given), plus `margin` times that
    span on each side; `warn` hears when the three points are nearly on one line (the plane is then
    decided by rounding, and its picture by little more)."""
    if len(paths) != 3:
        raise UserError(f"a plane needs exactly three solutions (--at A --at B --at C), got {len(paths)}")
    config, data, space, (w1, w2, w3) = load_points(paths, device, data_dir)
    u, v = plane_basis(w1, w2, w3)
    x, y, _ = project(torch.stack([w1, w2, w3]), w1, u, v)
    ratio = collinearity(x.tolist(), y.tolist())
    if warn is not None and ratio < COLLINEAR_BELOW:
        warn(f"the three points are nearly on one line (the third lies {ratio:.1%} of their span off the line "
             "through the first two): the plane's second axis is mostly rounding; a line (fastflat landscape "
             "line) shows them better")
    extent_x, extent_y, path = x.tolist(), y.tolist(), None
    if trajectory is not None:
        steps, weights = load_trajectory(trajectory, space)
        tx, ty, off = project(weights.to(w1.device), w1, u, v)
        path = {"run": str(trajectory), "steps": steps, "x": tx.tolist(), "y": ty.tolist(),
                "distance_off_plane": off.tolist()}
        extent_x, extent_y = extent_x + path["x"], extent_y + path["y"]
    span = max(max(extent_x) - min(extent_x), max(extent_y) - min(extent_y))
    xs, ys = grid_axis(extent_x, grid, margin, span), grid_axis(extent_y, grid, margin, span)
    u32, v32 = u.to(w1.dtype), v.to(w1.dtype)
    spec = {"kind": "plane", "paths": [str(p) for p in paths], "xs": xs, "ys": ys, "examples": examples,
            "seed": seed, "bn": BN_RULE if bn_update else False, **content_of(config, w1, w2, w3)}
    rows = score_points(_scorer(space, data, examples, seed, bn_update), grid * grid,
                        lambda i: w1 + xs[i % grid] * u32 + ys[i // grid] * v32, spec, cache_dir, points_at_once, progress)
    report = {**spec, "coords": torch.stack([x, y], 1).tolist(), **_columns(rows, (grid, grid)),
              "collinearity": ratio, "model": config["model"], "dataset": config["dataset"]}
    if path is not None:
        report["trajectory"] = path
    return report


COLLINEAR_BELOW = 0.05  # the third point closer to the first two's line than 5% of their span: warn


def collinearity(xs: list[float], ys: list[float]) -> float:
    """How far the third point lies off the line through the first two, as a share of the points' span
    (0: on the line). In plane coordinates the first two lie on the x axis, so that is |y3| / span."""
    span = max(max(xs) - min(xs), max(ys) - min(ys), 1e-30)
    return abs(ys[2] - ys[0]) / span


def line(a: str, b: str, t_range: tuple[float, float] = (-0.5, 1.5), points: int = 41, examples: int = 0,
         seed: int = 0, bn_update: bool = True, points_at_once: int = 1, device: str = "auto",
         data_dir: str | None = None, cache_dir: Path | None = None, progress: Progress | None = None) -> dict[str, Any]:
    """w(t) = (1 - t) w_A + t w_B: t = 0 is A (--from), t = 1 is B (--to), as on a curve; the range
    reaches past both."""
    config, data, space, (wa, wb) = load_points([a, b], device, data_dir)
    if torch.equal(wa, wb):
        raise UserError(f"{a} and {b} are the same weights: a line needs two distinct points")
    lo, hi = t_range
    if not lo < hi:
        raise UserError(f"--range {lo} {hi}: the start must be below the end")
    ts = [lo + (hi - lo) * i / (points - 1) for i in range(points)]
    spec = {"kind": "line", "from": str(a), "to": str(b), "t": ts, "examples": examples, "seed": seed, "bn": BN_RULE if bn_update else False,
            **content_of(config, wa, wb)}
    rows = score_points(_scorer(space, data, examples, seed, bn_update), points,
                        lambda i: (1 - ts[i]) * wa + ts[i] * wb, spec, cache_dir, points_at_once, progress)
    return {**spec, **_columns(rows), "distance": float((wa - wb).double().norm()),
            "model": config["model"], "dataset": config["dataset"]}


def rays(at: list[str], directions: int = 5, max_distance: float = 30.0, points: int = 16, filter_norm: bool = False,
         examples: int = 0, seed: int = 0, bn_update: bool = True, points_at_once: int = 1, device: str = "auto",
         data_dir: str | None = None, cache_dir: Path | None = None, progress: Progress | None = None) -> dict[str, Any]:
    """w + t d along `directions` random directions from each point of `at`, t in [0, max_distance]."""
    if directions < 1 or max_distance <= 0 or points < 2:
        raise UserError(f"--directions >= 1, --distance > 0 and --points >= 2 (got {directions}, {max_distance}, {points})")
    config, data, space, origins = load_points(at, device, data_dir)
    ts = [max_distance * i / (points - 1) for i in range(points)]
    scorer = _scorer(space, data, examples, seed, bn_update)
    report = {"kind": "rays", "at": [str(p) for p in at], "t": ts, "directions": directions,
              "filter_normalised": filter_norm, "examples": examples, "seed": seed, "bn": BN_RULE if bn_update else False, "rays": [],
              "model": config["model"], "dataset": config["dataset"]}
    total = len(at) * directions * points
    for which, w in enumerate(origins):
        dirs = random_directions(space, directions, seed, filter_norm, w)  # the same seeds from every origin
        spec = {**{k: report[k] for k in ("kind", "t", "directions", "filter_normalised", "examples", "seed", "bn")},
                "origin": str(at[which]), **content_of(config, w)}
        done_before = which * directions * points
        rows = score_points(scorer, directions * points, lambda i: w + ts[i % points] * dirs[i // points], spec,
                            cache_dir, points_at_once,
                            (lambda d, n: progress(done_before + d, total)) if progress else None)
        report["rays"].append({"at": str(at[which]), **_columns(rows, (directions, points))})
    return report


def load_trajectory(run: str | Path, space: WeightSpace) -> tuple[list[int], Tensor]:
    """The weights a run saved with --trajectory-every: (steps, (T, N) weights), in step order."""
    folder = Path(run) / "trajectory"
    files = sorted(folder.glob("step-*.pt"))
    if not files:
        raise UserError(f"{run} saved no trajectory: train it with --trajectory-every N")
    steps, weights = [], []
    for f in files:
        try:
            saved = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UserError(f"trajectory file {f} is unreadable ({type(e).__name__})") from None
        vector = saved.get("weights") if isinstance(saved, dict) else None
        if not isinstance(vector, Tensor) or vector.numel() != space.numel:
            raise UserError(f"trajectory file {f} does not hold {space.numel} weights of this model")
        steps.append(int(saved["step"]))
        weights.append(vector.reshape(-1))
    return steps, torch.stack(weights)


# -- curves --------------------------------------------------------------------------------------------------
def _curve_points(run: str | Path, device: str, data_dir: str | None):
    """A trained curve run's kind, config, data, space and (w1, theta, w2), from its member files."""
    from fastflat.methods.curve import ENDS
    from fastflat.runs.rundir import load_checkpoint

    config = load_checkpoint(run)["config"]
    if config["method"] != "curve":
        raise UserError(f"{run} is a {config['method']} run, not a curve (train one with fastflat curve)")
    members = {tag: Path(run) / "members" / f"{tag}.pt" for tag in ENDS}
    if missing := [t for t, p in members.items() if not p.is_file()]:
        raise UserError(f"{run} has no {', '.join(missing)} weights yet: finish training it first "
                        f"(fastflat curve --resume {run})")
    config, data, space, (w1, w2, theta) = load_points([str(members[t]) for t in ENDS], device, data_dir)
    return config["curve"]["kind"], config, data, space, (w1, theta, w2)


def curve_report(run: str | Path, points: int = 61, examples: int = 0, seed: int = 0, bn_update: bool = True,
                 points_at_once: int = 1, device: str = "auto", data_dir: str | None = None,
                 cache_dir: Path | None = None, progress: Progress | None = None) -> dict[str, Any]:
    """Along the trained curve and along the straight segment between its ends, at `points` values of t:
    train loss/error, test loss/error, test error of the ensemble {w1, point}; each path's barrier."""
    from fastflat.methods.curve import curve_point_

    if points < 2:
        raise UserError(f"--points must be at least 2 (the two ends), got {points}")
    kind, config, data, space, (w1, theta, w2) = _curve_points(run, device, data_dir)
    first = _scorer(space, data, examples, seed, bn_update)
    reference = first.test_probs(w1)  # w1's predictions, BatchNorm re-estimated as at every point
    scorer = _scorer(space, data, examples, seed, bn_update, reference_probs=reference)
    ts = [i / (points - 1) for i in range(points)]

    def on_curve(i: int) -> Tensor:
        out = [torch.empty_like(w1)]
        curve_point_(out, [w1], [theta], [w2], kind, ts[i])
        return out[0]

    report = {"kind": "curve", "curve_kind": kind, "run": str(run), "t": ts, "examples": examples, "seed": seed,
              "bn": BN_RULE if bn_update else False, "model": config["model"], "dataset": config["dataset"],
              "distance": float((w2 - w1).double().norm())}
    for name, vector_at in (("curve", on_curve), ("line", lambda i: (1 - ts[i]) * w1 + ts[i] * w2)):
        spec = {k: report[k] for k in ("kind", "curve_kind", "run", "t", "examples", "seed", "bn")} | {
            "path": name, **content_of(config, w1, theta, w2)}
        step = (lambda d, n, off=points if name == "line" else 0: progress(off + d, 2 * points)) if progress else None
        rows = score_points(scorer, points, vector_at, spec, cache_dir, points_at_once, step)
        cols = _columns(rows)
        report[name] = {**cols, "barrier": barrier(ts, cols["train_loss"]),
                        "test_barrier": barrier(ts, cols["test_loss"]),
                        "path_integral": path_integral(ts, cols["train_loss"])}
    return report


def curve_ensemble(run: str | Path, points: int, examples: int = 0, seed: int = 0, device: str = "auto",
                   data_dir: str | None = None, progress: Progress | None = None) -> dict[str, Any]:
    """The ensemble of `points` evenly spaced points of a trained curve, t = 0 .. 1 (BatchNorm
    re-estimated at each): each member's test error and the ensemble's as members are added."""
    from fastflat.methods.curve import curve_point_

    if points < 2:
        raise UserError(f"--points must be at least 2, got {points}")
    kind, config, data, space, (w1, theta, w2) = _curve_points(run, device, data_dir)
    scorer = _scorer(space, data, examples, seed, True)
    labels = torch.cat([y for _, y in scorer.test_batches])
    total, members, growing = None, [], []
    for i in range(points):
        t = i / (points - 1)
        out = [torch.empty_like(w1)]
        curve_point_(out, [w1], [theta], [w2], kind, t)
        probs = scorer.test_probs(out[0])
        total = probs if total is None else total + probs
        members.append({"t": t, "test_err": 100.0 * float((probs.argmax(1) != labels).float().mean())})
        growing.append(100.0 * float((total.argmax(1) != labels).float().mean()))
        if progress:
            progress(i + 1, points)
    return {"kind": "curve-ensemble", "run": str(run), "curve_kind": kind, "points": points, "members": members,
            "ensemble_err_by_size": growing, "ensemble_err": growing[-1], "examples": examples,
            "model": config["model"], "dataset": config["dataset"]}
