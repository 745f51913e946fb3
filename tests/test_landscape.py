"""Curves and loss-surface geometry: exact curve ends, the bend's chain rule, the plane's basis and
coordinates, grids that resume after a kill, batched scoring equal to the per-point loop, bad input."""

import json

import pytest
import torch
from torch import nn
from torch.func import functional_call

from fastflat import data as datasets
from fastflat.geometry import landscape
from fastflat.cli import main
from fastflat.loss.closures import BatchClosure
from fastflat.config import load_config
from fastflat.errors import UserError
from fastflat.flat import FlatParams
from fastflat.methods.curve import Curve, coefficients, curve_point_
from fastflat.data.models import build_model
from fastflat.geometry.points import PointScorer, WeightSpace
from fastflat.loop import resume, train

from helpers import StopAt


def vectors(n, seed, count=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=g) for _ in range(count)]


@pytest.mark.parametrize("kind", ["bezier", "polychain"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_curve_ends_reproduce_the_end_points_bit_for_bit(kind, backend, monkeypatch):
    monkeypatch.setenv("FASTFLAT_BACKEND", backend)
    w1, theta, w2 = vectors(1025, 0)
    for t, expected in ((0.0, w1), (1.0, w2)):
        out = [torch.empty_like(w1)]
        curve_point_(out, [w1], [theta], [w2], kind, t)
        assert torch.equal(out[0].view(torch.int32), expected.view(torch.int32))


@pytest.mark.parametrize("kind", ["bezier", "polychain"])
def test_curve_midpoint_and_continuity(kind):
    a, b, c = coefficients(kind, 0.5)
    assert a + b + c == pytest.approx(1.0)
    if kind == "polychain":
        assert (a, b, c) == (0.0, 1.0, 0.0)  # the chain passes through its bend at t = 0.5
        assert coefficients(kind, 0.5 - 1e-9) == pytest.approx(coefficients(kind, 0.5 + 1e-9), abs=1e-8)


class FakeServices:
    """What Curve.init asks of the trainer: the two end points' configs and flat weights."""

    resuming = False
    steps_per_epoch = total_steps = 1

    def __init__(self, ends):
        self.ends = ends

    def point_weights(self, path):
        return {"model": "fastcnn", "dataset": "synthetic"}, [self.ends[path].clone()]


@pytest.mark.parametrize("kind", ["bezier", "polychain"])
def test_the_bends_gradient_is_autograd_through_an_explicit_curve(kind):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 3)).double()
    flat = FlatParams(model)
    n = flat.numel
    w1, w2 = torch.randn(n, dtype=torch.float64), torch.randn(n, dtype=torch.float64)
    cfg = load_config(overrides={"method": "curve", "curve.start": "a", "curve.end": "b", "curve.kind": kind,
                                 "dataset": "synthetic", "momentum": 0.0, "weight_decay": 0.0})
    curve = Curve(cfg)
    curve.init(flat, FakeServices({"a": w1, "b": w2}))
    curve.bend[0].add_(torch.randn(n, dtype=torch.float64))  # away from the midpoint: a generic bend
    theta0 = curve.bend[0].clone()
    x, y = torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 3, (8,))
    curve.step(flat, BatchClosure(model, flat, x, y, "none"), lr=0.1)
    t = curve.t
    # the reference: phi(t) written out in autograd, the model called functionally at phi(t)
    theta = theta0.clone().requires_grad_(True)
    a, b, c = coefficients(kind, t)
    phi = a * w1 + b * theta + c * w2
    shapes = {name: p.shape for name, p in model.named_parameters()}
    params, start = {}, 0
    for name, shape in shapes.items():
        params[name] = phi[start : start + shape.numel()].view(shape)
        start += shape.numel()
    model.train()
    loss = nn.functional.cross_entropy(functional_call(model, params, (x,)), y)
    (expected,) = torch.autograd.grad(loss, theta)
    torch.testing.assert_close(curve.bend_grads[0], expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(curve.bend[0], theta0 - 0.1 * expected, rtol=1e-10, atol=1e-12)  # plain SGD step


def test_plane_basis_is_orthonormal_and_the_points_land_at_their_coordinates():
    w1, w2, w3 = vectors(4097, 1)
    u, v = landscape.plane_basis(w1, w2, w3)
    assert float(u @ u) == pytest.approx(1.0) and float(v @ v) == pytest.approx(1.0)
    assert abs(float(u @ v)) < 1e-12
    x, y, off = landscape.project(torch.stack([w1, w2, w3]), w1, u, v)
    assert (float(x[0]), float(y[0])) == (0.0, 0.0)
    assert float(x[1]) == pytest.approx(float((w2 - w1).double().norm())) and abs(float(y[1])) < 1e-9
    rebuilt = w1.double() + x[2] * u + y[2] * v
    torch.testing.assert_close(rebuilt, w3.double())  # w3 lies in its own plane
    assert float(off.max()) < 1e-9


def test_collinear_and_coincident_points_are_refused():
    w1, w2, _ = vectors(100, 2)
    with pytest.raises(UserError, match="collinear"):
        landscape.plane_basis(w1, w2, w1 + 2.5 * (w2 - w1))
    with pytest.raises(UserError, match="same weights"):
        landscape.plane_basis(w1, w1, w2)


def test_a_point_off_the_plane_reports_its_distance():
    w1, w2, w3 = vectors(50, 3)
    u, v = landscape.plane_basis(w1, w2, w3)
    normal = torch.randn(50, dtype=torch.float64)
    normal -= (normal @ u) * u + (normal @ v) * v
    normal /= normal.norm()
    _, _, off = landscape.project((w1.double() + 0.3 * u + 2.0 * normal)[None], w1, u, v)
    assert float(off[0]) == pytest.approx(2.0)


def test_barrier_and_path_integral():
    ts = [0.0, 0.5, 1.0]
    assert landscape.barrier(ts, [1.0, 3.0, 2.0]) == pytest.approx(1.5)
    assert landscape.path_integral(ts, [1.0, 3.0, 2.0]) == pytest.approx(2.25)


@pytest.fixture(scope="module")
def scorer():
    torch.manual_seed(0)
    data = datasets.load_dataset("synthetic", None, "cpu", 0.0, 0)
    model = build_model("cnn", data.in_channels, data.num_classes, data.image_size)
    space = WeightSpace(model)
    return PointScorer(space, data, examples=300, seed=0, batch_size=128)


def test_batched_scoring_equals_the_per_point_loop(scorer):
    w = scorer.space.get()
    g = torch.Generator().manual_seed(4)
    points = torch.stack([w + 0.05 * torch.randn(w.shape, generator=g) for _ in range(3)])
    loop = [scorer.score_one(p) for p in points]
    batched = scorer.score_batched(points)
    for a, b in zip(loop, batched):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-4), key


def test_test_probs_are_the_predictions_score_one_scores(scorer):
    w = scorer.space.get() + 0.05 * torch.randn(scorer.space.numel, generator=torch.Generator().manual_seed(5))
    probs = scorer.test_probs(w)
    labels = torch.cat([y for _, y in scorer.test_batches])
    row = scorer.score_one(w)
    assert probs.shape == (len(labels), 10)
    assert 100.0 * float((probs.argmax(1) != labels).float().mean()) == pytest.approx(row["test_err"], abs=1e-4)
    assert float(-probs[torch.arange(len(labels)), labels].log().mean()) == pytest.approx(row["test_loss"], rel=1e-4)


def test_filter_normalised_directions_match_each_filter_of_the_weights(scorer):
    w = scorer.space.get()
    first = landscape.random_directions(scorer.space, 2, seed=3, filter_norm=True, at=w)
    again = landscape.random_directions(scorer.space, 2, seed=3, filter_norm=True, at=w)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], first[1])
    conv_or_linear = 0
    for offset, shape in scorer.space.layout.values():
        for d in first:
            part = d[offset : offset + shape.numel()]
            if len(shape) <= 1:  # biases and BatchNorm's affine: no perturbation
                assert torch.count_nonzero(part) == 0
                continue
            conv_or_linear += 1
            filters = part.view(shape[0], -1).norm(dim=1)
            expected = w[offset : offset + shape.numel()].view(shape[0], -1).norm(dim=1)
            torch.testing.assert_close(filters, expected, rtol=1e-5, atol=1e-7)
    assert conv_or_linear >= 4
    for d in landscape.random_directions(scorer.space, 2, seed=3, filter_norm=False, at=w):
        assert float(d.double().norm()) == pytest.approx(1.0, rel=1e-6)


def test_a_killed_grid_resumes_without_recomputing_done_points(scorer, tmp_path):
    w = scorer.space.get()
    made = []

    def vector_at(i):
        made.append(i)
        if i == 3 and not killed[0]:
            killed[0] = True
            raise KeyboardInterrupt  # the kill, while point 3 is being built
        return w + 0.01 * i

    killed = [False]
    spec = {"kind": "test"}
    with pytest.raises(KeyboardInterrupt):
        landscape.score_points(scorer, 6, vector_at, spec, tmp_path)
    cache = next(tmp_path.glob(".points-*.jsonl"))
    assert len(cache.read_text().splitlines()) == 3
    with open(cache, "a") as f:
        f.write('{"i": 3, "train_lo')  # a line torn by the kill: scored again, not trusted
    made.clear()
    rows = landscape.score_points(scorer, 6, vector_at, spec, tmp_path)
    assert made == [3, 4, 5] and len(rows) == 6
    fresh = landscape.score_points(scorer, 6, lambda i: w + 0.01 * i, spec, None)
    for row, expected in zip(rows, fresh):
        assert row == pytest.approx(expected)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ends")
    for seed in (0, 1):
        train(load_config(overrides={"dataset": "synthetic", "epochs": 1, "seed": seed, "out": str(out),
                                     "name": f"s{seed}", "trajectory_every": 4}))
    return out


def test_trajectory_files_hold_the_weights_every_n_steps(two_runs):
    files = sorted((two_runs / "s0" / "trajectory").glob("step-*.pt"))
    steps = [torch.load(f, weights_only=True)["step"] for f in files]
    assert steps == [0, 4, 8]
    final = torch.load(two_runs / "s0" / "checkpoint.pt", weights_only=True)["model"]
    last = torch.load(files[-1], weights_only=True)["weights"]
    assert torch.equal(last[: final["features.0.weight"].numel()], final["features.0.weight"].reshape(-1))


def test_a_curve_run_interrupted_mid_epoch_resumes_to_the_same_bend(two_runs, tmp_path):
    def config(out):
        return load_config(overrides={"method": "curve", "curve.start": str(two_runs / "s0"),
                                      "curve.end": str(two_runs / "s1"), "dataset": "synthetic", "epochs": 2,
                                      "out": str(out), "name": "c"})

    train(config(tmp_path / "whole"))
    with pytest.raises(KeyboardInterrupt):
        train(config(tmp_path / "cut"), hooks=StopAt(step=5))
    resume(tmp_path / "cut" / "c")
    for tag in ("bend", "start", "end"):
        a = torch.load(tmp_path / "whole" / "c" / "members" / f"{tag}.pt", weights_only=True)
        b = torch.load(tmp_path / "cut" / "c" / "members" / f"{tag}.pt", weights_only=True)
        assert all(torch.equal(a[k], b[k]) for k in a), tag


def test_fastflat_curve_writes_the_report_and_the_curve_beats_the_segment(two_runs, tmp_path):
    code = main(["curve", "--start", str(two_runs / "s0"), "--end", str(two_runs / "s1"), "--epochs", "2",
                 "--points", "5", "--examples", "256", "--device", "cpu", "--out", str(tmp_path), "--name", "bz"])
    assert code == 0
    report = json.loads((tmp_path / "bz" / "curve.json").read_text())
    for path in ("curve", "line"):
        assert len(report[path]["train_loss"]) == 5 and "barrier" in report[path] and "ensemble_err" in report[path]
        assert report[path]["train_loss"][0] == pytest.approx(report["line"]["train_loss"][0])  # both start at w1
    assert report["curve"]["barrier"] < report["line"]["barrier"]
    assert (tmp_path / "bz" / "curve.png").stat().st_size > 0


@pytest.mark.parametrize("args, message", [
    (["landscape", "line", "--from", "{a}", "--to", "{a}"], "same weights"),
    (["landscape", "plane", "--at", "{a}", "--at", "{b}", "--at", "{a}"], "collinear"),
    (["landscape", "plane", "--at", "{a}", "--at", "{b}"], "exactly three"),
    (["landscape", "rays", "--at", "{a}", "--directions", "0"], "directions"),
    (["landscape", "line", "--from", "{a}", "--to", "{b}/members/swa.pt"], "does not exist"),
    (["ensemble", "--curve", "{a}"], "not a curve"),
    (["curve", "--start", "{a}"], "both end points"),
])
def test_bad_landscape_input_is_one_line_and_exit_2_with_nothing_overwritten(two_runs, tmp_path, capsys, args, message):
    out = tmp_path / "out"
    out.mkdir()
    (out / "line.json").write_text("kept")
    argv = [a.format(a=two_runs / "s0", b=two_runs / "s1") for a in args]
    if argv[0] == "landscape":
        argv += ["--out", str(out), "--examples", "64", "--device", "cpu"]
    if argv[0] == "ensemble":
        argv += ["--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert (out / "line.json").read_text() == "kept"
    assert [p.name for p in out.iterdir() if p.name != ".points-cache"] == ["line.json"]  # no empty results directory


def test_points_of_different_architectures_are_refused(two_runs, tmp_path):
    train(load_config(overrides={"dataset": "synthetic", "model": "preact-resnet18", "epochs": 1, "subset": 128,
                                 "batch_size": 64, "out": str(tmp_path), "name": "big"}))
    with pytest.raises(UserError, match="must share one model and dataset"):
        landscape.load_points([str(two_runs / "s0"), str(tmp_path / "big")], device="cpu")


# -- one vocabulary, honest pictures --------------------------------------------------------------------------
def test_a_line_starts_at_from(two_runs):
    a, b = str(two_runs / "s0"), str(two_runs / "s1")
    along = landscape.line(a, b, (0.0, 1.0), 2, examples=64, device="cpu")
    at_a = landscape.rays([a], directions=1, max_distance=1.0, points=2, examples=64, device="cpu")["rays"][0]
    at_b = landscape.rays([b], directions=1, max_distance=1.0, points=2, examples=64, device="cpu")["rays"][0]
    assert along["train_loss"][0] == pytest.approx(at_a["train_loss"][0][0], rel=1e-6)  # t = 0: --from
    assert along["train_loss"][1] == pytest.approx(at_b["train_loss"][0][0], rel=1e-6)  # t = 1: --to


def test_the_plane_grid_covers_its_points_and_trajectory_and_warns_when_nearly_collinear(two_runs, monkeypatch):
    a, b = str(two_runs / "s0"), str(two_runs / "s1")
    config, data, space, (wa, wb) = landscape.load_points([a, b], "cpu")
    nudge = torch.randn(wa.shape, generator=torch.Generator().manual_seed(0)) * 1e-4
    monkeypatch.setattr(landscape, "load_points", lambda *args: (config, data, space, (wa, wb, wa + 2 * (wb - wa) + nudge)))
    heard = []
    report = landscape.plane([a, b, a], grid=3, margin=0.1, examples=32, trajectory=a, device="cpu", warn=heard.append)
    assert len(heard) == 1 and "nearly on one line" in heard[0] and report["collinearity"] < 0.05
    xs, ys = report["xs"], report["ys"]
    plotted = report["coords"] + list(zip(report["trajectory"]["x"], report["trajectory"]["y"]))
    assert all(xs[0] <= x <= xs[-1] and ys[0] <= y <= ys[-1] for x, y in plotted)
    assert ys[-1] - ys[0] >= 0.2 * (xs[-1] - xs[0]) / 1.2 - 1e-9  # a second axis wide enough to see, not a sliver

    assert landscape.collinearity([0.0, 1.0, 0.5], [0.0, 0.0, 0.5]) == pytest.approx(0.5)  # well off the line


def test_every_figure_labels_its_axes_and_colour_bars(tmp_path, monkeypatch):
    """Each plot with a synthetic report: every data axes has x and y labels, every colour bar a label."""
    import matplotlib.pyplot as plt

    from fastflat.analysis import plots
    from fastflat.analysis.toy import plot_toy, run_toy

    figures = []
    monkeypatch.setattr(plots, "save_figure", lambda fig, path: figures.append(fig))
    grid = [[1.0, 2.0, 3.0], [2.0, 3.0, 4.0], [3.0, 4.0, 5.0]]
    plots.plot_plane({"xs": [0, 1, 2], "ys": [0, 1, 2], "train_loss": grid, "test_err": grid,
                      "coords": [[0, 0], [1, 0], [0, 1]], "trajectory": {"x": [0, 1], "y": [0, 1]}}, tmp_path / "p.png")
    plots.plot_line({"t": [0, 1], "train_loss": [1, 2], "test_loss": [1, 2], "train_err": [1, 2], "test_err": [1, 2],
                     "from": "a", "to": "b", "distance": 1.0}, tmp_path / "l.png")
    plots.plot_rays({"t": [0, 1], "filter_normalised": False,
                     "rays": [{"at": "a", "train_err": [[1, 2]], "test_err": [[1, 2]]}]}, tmp_path / "r.png")
    path = {"train_loss": [1, 2], "test_err": [1, 2], "barrier": 1.0}
    plots.plot_curve({"t": [0, 1], "curve": path, "line": path, "curve_kind": "bezier", "run": "c"}, tmp_path / "c.png")
    plots.plot_spectral_density([{"checkpoint": "a", "density": {"nodes": [0.0, 1.0], "weights": [0.5, 0.5]}}],
                                tmp_path / "d.png")
    plots.plot_training_curves([{"epoch": 1, "train_loss": 1, "test_loss": 1, "train_acc": 1, "test_acc": 1, "lr": 0.1}],
                               tmp_path / "t.png", steps=[{"epoch": 0.5, "train_loss": 1, "train_acc": 1, "lr": 0.1}])
    monkeypatch.setattr("fastflat.analysis.plots.save_figure", lambda fig, path: figures.append(fig))
    plot_toy(run_toy("easom", "sgd", 2, 0.3, 10, None, 0), tmp_path / "toy.png")
    assert len(figures) == 7
    density = next(line for line in figures[4].axes[0].lines)
    shown = [y for y in density.get_ydata() if y == y]
    assert min(shown) >= max(shown) * 1e-10 and len(shown) < len(density.get_ydata())  # a gap, not a 1e-12 floor
    for fig in figures:
        colour_bars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
        for ax in fig.axes:
            if ax in colour_bars:
                assert ax.get_ylabel(), f"an unlabelled colour bar in {fig}"
            else:
                assert ax.get_xlabel() and ax.get_ylabel(), f"axes {ax.get_title()!r} lacks a label"
        plt.close(fig)


def test_the_running_line_breaks_at_each_epoch():
    from fastflat.analysis.plots import _broken_at_epochs

    steps = [{"epoch": e, "train_loss": v} for e, v in ((0.5, 2.0), (1.0, 1.5), (1.5, 1.4), (2.0, 1.2))]
    xs, ys = _broken_at_epochs(steps, "train_loss")
    assert xs[:2] == [0.5, 1.0] and xs[2] != xs[2] and xs[3:] == [1.5, 2.0]  # a NaN gap between epoch 1 and 2


def test_a_points_batchnorm_statistics_are_those_of_all_its_examples(scorer):
    """300 examples in batches of 128, 128 and 44: the statistics one batch of all 300 would give, not
    torch's per-batch average (where the short batch would weigh as much as a full one)."""
    scorer._load(scorer.space.get())
    bn = next(m for m in scorer.model.modules() if isinstance(m, nn.BatchNorm2d))
    seen = []
    handle = bn.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].detach()))
    with torch.no_grad():
        scorer.model.train()
        scorer.model(torch.cat([x for x, _ in scorer.train_batches]))
    handle.remove()
    x = seen[0].transpose(0, 1).reshape(seen[0].shape[1], -1).double()
    scorer._load(scorer.space.get())  # the statistics again (the forward above moved them)
    torch.testing.assert_close(bn.running_mean.double(), x.mean(1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var.double(), x.var(1), rtol=1e-4, atol=1e-6)
