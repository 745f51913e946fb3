"""Sharpness measures against matrices with known spectra, a tiny network's dense Hessian, and quadratics."""


import pytest
import torch
from torch import nn

import fastflat
from fastflat.errors import UserError
from fastflat.analysis.sharpness import ascend_in_ball, hutchinson, lanczos, m_sharpness, model_operator, power_iteration


def matrix_with_spectrum(eigenvalues, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigenvalues), len(eigenvalues), generator=g, dtype=torch.float64))
    return q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ q.T


SPECTRUM = [10.0, 7.0, 5.0, 2.0] + [0.5] * 20 + [-3.0] + [0.01] * 35  # 60: one negative, a flat bulk


def test_lanczos_finds_the_top_eigenvalues_of_a_known_spectrum():
    a = matrix_with_spectrum(SPECTRUM)
    result = lanczos(lambda v: a @ v, len(SPECTRUM), k=3, tol=1e-8, dtype=torch.float64)
    assert result["eigenvalues"] == pytest.approx([10.0, 7.0, 5.0], rel=1e-6)
    assert result["hvps"] < len(SPECTRUM)  # converged before building the whole space


def test_power_iteration_finds_the_largest_eigenvalue():
    a = matrix_with_spectrum(SPECTRUM)
    result = power_iteration(lambda v: a @ v, len(SPECTRUM), tol=1e-10, max_iters=500, dtype=torch.float64)
    assert result["converged"] and result["eigenvalue"] == pytest.approx(10.0, rel=1e-6)


def test_hutchinson_is_unbiased_on_a_known_matrix():
    a = matrix_with_spectrum(SPECTRUM)
    result = hutchinson(lambda v: a @ v, len(SPECTRUM), probes=400, dtype=torch.float64)
    assert abs(result["trace"] - sum(SPECTRUM)) < 3 * result["trace_stderr"] and result["trace_stderr"] > 0


def tiny_net():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    flat = fastflat.flatten(model)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(40, 1, 2, 3, generator=g, dtype=torch.float64), torch.randint(0, 3, (40,), generator=g)
    return model, flat, x, y


def dense_hessian(model, flat, x, y):
    names = flat.vectors[0].names
    shapes = [model.get_parameter(n).shape for n in names]
    w0 = flat.params[0].detach().clone()

    def loss(w):
        params, offset = {}, 0
        for name, shape in zip(names, shapes):
            params[name] = w[offset : offset + shape.numel()].view(shape)
            offset += shape.numel()
        return nn.functional.cross_entropy(torch.func.functional_call(model, params, (x,)), y)

    return torch.autograd.functional.hessian(loss, w0)


def test_hessian_vector_products_are_exact_against_the_dense_hessian():
    model, flat, x, y = tiny_net()
    h = dense_hessian(model, flat, x, y)
    op = model_operator(flat, [(x[:13], y[:13]), (x[13:], y[13:])])  # chunks of unequal size
    v = torch.randn(flat.numel, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(op(v), h @ v, rtol=1e-10, atol=1e-12)
    assert op.calls == 1


def test_hessian_vector_products_read_a_channels_last_buffer_by_its_strides():
    from fastflat.data.models import SmallCNN
    from fastflat.loss.hessian import KeptGraphs, hvp

    torch.manual_seed(0)
    plain, laid = SmallCNN(1, 10, (4, 8, 8)).double(), SmallCNN(1, 10, (4, 8, 8)).double()
    laid.load_state_dict(plain.state_dict())
    flat_plain, flat_laid = fastflat.flatten(plain), fastflat.flatten(laid, channels_last=True)
    chunks = [(torch.randn(5, 1, 12, 12, dtype=torch.float64), torch.randint(0, 10, (5,)))]
    v_plain = torch.randn(flat_plain.numel, dtype=torch.float64)
    v_laid = torch.zeros_like(v_plain)
    for piece, same in zip(flat_laid.shaped([v_laid]), flat_plain.shaped([v_plain])):
        piece.copy_(same)  # the same direction, parameter by parameter, in the other layout
    want = flat_plain.shaped(hvp(flat_plain, chunks, [v_plain]))
    for got in (hvp(flat_laid, chunks, [v_laid]), KeptGraphs(flat_laid, chunks)([v_laid])):
        for a, b in zip(flat_laid.shaped(got), want):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_lanczos_and_power_agree_with_the_dense_hessian_of_a_tiny_network():
    model, flat, x, y = tiny_net()
    top = torch.linalg.eigvalsh(dense_hessian(model, flat, x, y)).flip(0)
    op = model_operator(flat, [(x, y)])
    assert lanczos(op, flat.numel, k=2, tol=1e-9, dtype=torch.float64)["eigenvalues"] == pytest.approx(top[:2].tolist(), rel=1e-6)
    if top[0] > abs(top[-1]):  # power iteration finds the largest magnitude
        assert power_iteration(op, flat.numel, tol=1e-10, max_iters=1000, dtype=torch.float64)["eigenvalue"] == pytest.approx(top[0].item(), rel=1e-4)


@pytest.mark.parametrize("ball", ["l2", "linf"])
def test_ascent_never_leaves_the_ball_and_finds_the_maximum_of_a_quadratic(ball):
    a = matrix_with_spectrum([4.0, 1.0, 0.5, 0.2, 0.1], seed=3)
    rho = 0.3
    seen = []

    def loss_grad(e):
        seen.append(e.clone())
        return float(0.5 * e @ a @ e), a @ e

    result = ascend_in_ball(loss_grad, torch.zeros(5, dtype=torch.float64), rho, ball, steps=200)
    bound = [e.norm() for e in seen] if ball == "l2" else [e.abs().max() for e in seen]
    assert max(bound) <= rho * (1 + 1e-9)
    if ball == "l2":  # the maximum is at rho times the top eigenvector: rho^2 * 4 / 2
        assert result["sharpness"] == pytest.approx(0.5 * 4.0 * rho**2, rel=1e-3)
    else:  # a vertex of the cube: the exact maximum over the 32 sign patterns
        corners = torch.cartesian_prod(*[torch.tensor([-rho, rho], dtype=torch.float64)] * 5)
        assert result["sharpness"] == pytest.approx(max(float(0.5 * c @ a @ c) for c in corners), rel=1e-6)


def test_m_sharpness_restores_the_weights_and_is_positive_at_a_trained_point():
    model, flat, x, y = tiny_net()
    before = flat.params[0].clone()
    value = m_sharpness(flat, [(x[:20], y[:20]), (x[20:], y[20:])], rho=0.05)
    assert value > 0 and torch.equal(flat.params[0], before)


@pytest.mark.parametrize("call", [lambda: lanczos(lambda v: v, 5, k=0), lambda: hutchinson(lambda v: v, 5, probes=1),
                                  lambda: ascend_in_ball(lambda e: (0.0, e), torch.zeros(3), rho=0.0)])
def test_bad_settings_are_user_errors(call):
    with pytest.raises(UserError):
        call()


def test_sharpness_command_compares_checkpoints_and_writes_json(capsys, tmp_path):
    import json

    from fastflat.cli import main

    for method in ("sgd", "sam"):
        assert main(["train", "--dataset", "synthetic", "--epochs", "1", "--method", method, "--out", str(tmp_path),
                     "--name", method]) == 0
    capsys.readouterr()
    code = main(["sharpness", str(tmp_path / "sgd"), str(tmp_path / "sam"), "--examples", "128", "--top", "2",
                 "--trace-probes", "2", "--m", "64", "--ball", "l2,linf", "--density", "2", "--out", str(tmp_path), "--name", "s", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and (tmp_path / "s" / "sharpness.json").exists() and len(report["checkpoints"]) == 2
    for r in report["checkpoints"]:
        assert len(r["top_eigenvalues"]) == 2 and r["top_eigenvalues"][0] >= r["top_eigenvalues"][1]
        assert r["hvps"] >= 2 + 2 and r["trace_stderr"] >= 0 and set(r["sharpness"]) == {"l2_m64", "linf_m64"}
        assert r["examples"] == 128 and "eval" in r["mode"]
        assert sum(r["density"]["weights"]) == pytest.approx(1.0, rel=1e-5)
    assert (tmp_path / "s" / "density.png").stat().st_size > 10_000


@pytest.mark.parametrize("args, says", [(["--examples", "5000"], "larger than the 1024 training examples"),
                                        (["--rho", "0"], "--rho 0.0: a finite radius > 0"), (["--top", "0"], "--top 0: 1 to 50"),
                                        (["--ball", "l3"], "--ball 'l3': l2, linf or l2,linf")])
def test_sharpness_bad_input_is_one_line(capsys, tmp_path, args, says):
    from fastflat.cli import main

    assert main(["train", "--dataset", "synthetic", "--epochs", "1", "--out", str(tmp_path), "--name", "r"]) == 0
    capsys.readouterr()
    code = main(["sharpness", str(tmp_path / "r"), "--trace-probes", "0", *args])
    err = capsys.readouterr().err
    assert code == 2 and says in err and err.count("\n") == 1 and "Traceback" not in err


def test_slq_weights_sum_to_one_and_reproduce_each_probes_quadratic_form():
    from fastflat.analysis.sharpness import density_curve, slq_density

    a = matrix_with_spectrum(SPECTRUM)
    result = slq_density(lambda v: a @ v, len(SPECTRUM), probes=3, steps=20, dtype=torch.float64)
    nodes, weights = torch.tensor(result["nodes"]), torch.tensor(result["weights"])
    assert weights.sum().item() == pytest.approx(1.0, rel=1e-9)
    assert nodes.max().item() == pytest.approx(10.0, rel=1e-6) and nodes.min().item() == pytest.approx(-3.0, rel=1e-4)
    # Gauss quadrature is exact for degree 1: sum of weights x nodes = mean over probes of v^T A v
    g = torch.Generator().manual_seed(0)
    probes = [torch.randn(len(SPECTRUM), generator=g, dtype=torch.float64) for _ in range(3)]
    expected = sum(float(v @ a @ v / (v @ v)) for v in probes) / 3
    assert float((weights * nodes).sum()) == pytest.approx(expected, rel=1e-9)
    t, p = density_curve(result["nodes"], result["weights"])
    assert float(torch.trapezoid(p, t)) == pytest.approx(1.0, abs=1e-3)
    assert result["hvps"] == 3 * 7  # the products made: 7 distinct eigenvalues end each Krylov space (it said 60)
    scaled_identity = slq_density(lambda v: 2.0 * v, 60, probes=3, steps=20, dtype=torch.float64)
    assert scaled_identity["hvps"] == 3 and scaled_identity["nodes"] == pytest.approx([2.0] * 3)  # exact after 1 step


def test_kept_graphs_give_the_same_products_as_recomputing_them():
    """One chunk graph kept (PyHessian's way) or rebuilt per product: the same H v, over uneven chunks."""
    from fastflat.analysis.sharpness import model_operator
    from fastflat.data.models import build_model
    from fastflat.flat import FlatParams
    from fastflat.loss.hessian import graph_bytes

    torch.manual_seed(0)
    model = build_model("cnn", 1, 10, 16).eval().double()
    flat = FlatParams(model)
    chunks = [(torch.randn(n, 1, 16, 16, dtype=torch.float64), torch.randint(0, 10, (n,))) for n in (7, 5)]
    v = torch.randn(flat.numel, dtype=torch.float64)
    kept, rebuilt = model_operator(flat, chunks, keep_graphs=True), model_operator(flat, chunks, keep_graphs=False)
    assert torch.allclose(kept(v), rebuilt(v), rtol=1e-10, atol=1e-12) and kept.kept_graphs and not rebuilt.kept_graphs
    assert torch.allclose(kept(2 * v), 2 * rebuilt(v), rtol=1e-10, atol=1e-12)  # the graphs survive a product
    assert graph_bytes(flat, chunks[0]) > graph_bytes(flat, (chunks[1][0][:1], chunks[1][1][:1])) > 0


def test_lanczos_stops_by_the_eigenvalue_error_not_the_vector_residual():
    """The Kato-Temple bound r^2 / gap: within tol of the eigenvalue with fewer products than the
    residual rule, and still within tol of the truth."""
    from fastflat.analysis.sharpness import error_bounds

    torch.manual_seed(1)
    spectrum = torch.cat([torch.tensor([40.0, 30.0, 22.0]), torch.rand(300) * 2], ).double()
    q, _ = torch.linalg.qr(torch.randn(303, 303, dtype=torch.float64))
    a = q @ torch.diag(spectrum) @ q.T
    result = lanczos(lambda v: a @ v, 303, k=1, tol=1e-3, dtype=torch.float64)
    assert abs(result["eigenvalues"][0] - 40.0) <= 1e-3 * 40.0 and result["hvps"] <= 10
    ritz, vectors = torch.tensor([1.0, 5.0, 10.0], dtype=torch.float64), torch.eye(3, dtype=torch.float64)
    assert float(error_bounds(ritz, vectors, 0.5, 1)[0]) == pytest.approx(min(0.5, 0.25 / 5.0))


def _three_outliers() -> tuple[torch.Tensor, torch.Tensor]:
    """A 303 x 303 symmetric matrix: eigenvalues 40, 30, 22 over a bulk in [0, 2]; and its eigenvectors (columns)."""
    torch.manual_seed(1)
    spectrum = torch.cat([torch.tensor([40.0, 30.0, 22.0]), torch.rand(300) * 2]).double()
    q, _ = torch.linalg.qr(torch.randn(303, 303, dtype=torch.float64))
    return q @ torch.diag(spectrum) @ q.T, q


def test_lanczos_from_a_good_start_does_not_stop_on_a_gap_to_the_bulk():
    """From a start near the top eigenvector, 2 steps leave one other Ritz value, deep in the bulk; r^2 / gap
    with that gap claimed 1e-3 and stopped with an error of 1.9e-3. The residual decides until there are 3."""
    a, q = _three_outliers()
    start = q[:, 0] + 0.1 * q[:, 1] + 0.02 * torch.randn(303, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    result = lanczos(lambda v: a @ v, 303, k=1, tol=1e-3, dtype=torch.float64, start=start)
    assert abs(result["eigenvalues"][0] - 40.0) <= 1e-3 * 40.0 and result["hvps"] == 3


def test_a_start_from_a_nearby_operator_saves_products_at_the_same_tolerance():
    """subsample_start on A + E (E: noise of norm 4, as a subsample's Hessian differs from the whole one's)
    gives a vector close to A's top eigenvector, from which Lanczos on A stops sooner than from any of 5
    random vectors, within the same tolerance."""
    from fastflat.analysis.sharpness import subsample_start

    a, q = _three_outliers()
    e = torch.randn(303, 303, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    e = (e + e.T) / 2
    noisy = a + e * 4 / torch.linalg.matrix_norm(e, 2)
    start, products = subsample_start(lambda v: noisy @ v, 303, dtype=torch.float64)
    assert 1 <= products <= 10 and float(start.norm()) == pytest.approx(1.0) and float(start @ q[:, 0]) ** 2 > 0.9
    warm = lanczos(lambda v: a @ v, 303, k=1, tol=1e-3, dtype=torch.float64, start=start)
    cold = [lanczos(lambda v: a @ v, 303, k=1, tol=1e-3, dtype=torch.float64, seed=s)["hvps"] for s in range(5)]
    assert abs(warm["eigenvalues"][0] - 40.0) <= 1e-3 * 40.0 and warm["hvps"] < min(cold)
    two, _ = subsample_start(lambda v: noisy @ v, 303, k=2, dtype=torch.float64)  # for the top 2: their sum
    assert float(two @ q[:, 0]) ** 2 > 0.3 and float(two @ q[:, 1]) ** 2 > 0.3


def test_subsample_takes_every_eighth_example_of_each_chunk_or_none_below_32():
    from fastflat.analysis.sharpness import subsample

    chunks = [(torch.arange(256.0)[:, None], torch.arange(256)), (torch.arange(100.0)[:, None], torch.arange(100))]
    picked = subsample(chunks)
    assert [y.tolist() for _, y in picked] == [list(range(0, 256, 8)), list(range(0, 100, 8))]
    assert subsample([(torch.zeros(248, 1), torch.zeros(248))]) is None  # 31 examples


def test_sharpness_starts_lanczos_from_every_eighth_example_when_there_are_256(tmp_path):
    from fastflat.analysis.sharpness import measure_checkpoint
    from fastflat.cli import main

    assert main(["train", "--dataset", "synthetic", "--epochs", "1", "--out", str(tmp_path), "--name", "r"]) == 0
    few = measure_checkpoint(str(tmp_path / "r"), examples=248, probes=0)
    enough = measure_checkpoint(str(tmp_path / "r"), examples=256, probes=0)
    assert (few["start_hvps"], few["start_examples"]) == (0, 0)
    assert enough["start_examples"] == 32 and enough["start_hvps"] >= 1 and enough["hvps"] >= 1
    assert enough["top_eigenvalues"][0] > 0
