"""The SAM talk's 2-D functions: known minima, trajectories, the command's files and its bad input."""

import json
import math

import pytest
import torch

from fastflat.cli import main
from fastflat.analysis.toy import SURFACES, surface, trajectory


@pytest.mark.parametrize("name, point, value", [
    ("easom", (math.pi, math.pi), -1.0), ("eggholder", (512.0, 404.2319), -959.6407),
    ("rastrigin", (0.0, 0.0), 0.0), ("rosenbrock", (1.0, 1.0), 0.0)])
def test_each_function_has_its_known_global_minimum(name, point, value):
    s = SURFACES[name]
    assert float(s.f(torch.tensor(point[0], dtype=torch.float64), torch.tensor(point[1], dtype=torch.float64))) == pytest.approx(value, abs=1e-4)
    xs, ys = torch.meshgrid(torch.linspace(*s.domain[:2], 201, dtype=torch.float64),
                            torch.linspace(*s.domain[2:], 201, dtype=torch.float64), indexing="xy")
    assert float(s.f(xs, ys).min()) >= value - 1e-6  # nothing on a grid of the domain goes lower


def test_sgd_descends_into_easoms_basin_from_a_start_near_it():
    path = trajectory(surface("easom"), (3.6, 3.6), "sgd", lr=0.5, steps=200, rho=None)
    assert math.dist(path[-1], (math.pi, math.pi)) < 1e-3


def test_sam_with_a_vanishing_radius_follows_the_base_optimizer():
    s = surface("rosenbrock")
    plain = trajectory(s, (-1.0, 2.0), "adam", lr=0.01, steps=50, rho=None)
    sam = trajectory(s, (-1.0, 2.0), "adam", lr=0.01, steps=50, rho=1e-12)
    assert plain[-1] == pytest.approx(sam[-1], abs=1e-6)


def test_toy_command_writes_json_and_png(capsys, tmp_path):
    assert main(["toy", "--fn", "rastrigin", "--optimizer", "adam", "--starts", "2", "--steps", "30",
                 "--out", str(tmp_path)]) == 0
    folder = next(tmp_path.glob("toy-rastrigin-adam-*"))  # a new directory named by the command, never overwritten
    report = json.loads((folder / "toy.json").read_text())
    assert len(report["runs"]) == 4 and {r["kind"] for r in report["runs"]} == {"plain", "sam"}
    assert report["runs"][0]["start"] == report["runs"][1]["start"]  # same starts for both
    assert (folder / "toy.png").stat().st_size > 10_000


@pytest.mark.parametrize("args, says", [(["--fn", "himmelblau"], "unknown function 'himmelblau'"),
                                        (["--optimizer", "lbfgs"], "unknown optimizer"), (["--rho", "0"], "--rho must be > 0")])
def test_toy_bad_input_is_one_line(capsys, tmp_path, args, says):
    code = main(["toy", *args, "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and says in err and err.count("\n") == 1
