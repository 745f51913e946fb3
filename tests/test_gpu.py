"""On a CUDA device: the compiled kernels against their twins at real sizes, and SAM end to end.

Marked `gpu`: skipped with a reason on machines without CUDA (CI), run wherever a GPU is present.
"""

import pytest
import torch

from fastflat import ops

from fastflat.ops import kernels

pytestmark = pytest.mark.gpu

SIZES = [1, 7, 1023, 1025, 11_173_962, 2**24 + 3]  # 11.17M = ResNet-18 (CIFAR) parameters


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_sam_perturb_and_norm_match_twins(n, dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(n, device="cuda", generator=g).to(dtype)
    grad = torch.randn(n, device="cuda", generator=g).to(dtype)
    sq_kernel, sq_twin = kernels.sqnorm(grad), ops.sqnorm_torch(grad)
    torch.testing.assert_close(sq_kernel, sq_twin, rtol=1e-5, atol=0)
    w_kernel, w_twin = w.clone(), w.clone()
    b_kernel, b_twin = torch.empty_like(w), torch.empty_like(w)
    kernels.sam_perturb_(w_kernel, grad, b_kernel, sq_twin, 0.05, "l2", False)
    ops.sam_perturb_torch_(w_twin, grad, b_twin, sq_twin, 0.05, "l2", False)
    assert torch.equal(b_kernel, w)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(w_kernel, w_twin, rtol=tol, atol=tol)


@pytest.mark.parametrize("n", SIZES)
def test_compiled_clip_matches_twin(n):
    grad = torch.randn(n, device="cuda")
    total = ops.sqnorm_torch(grad).sqrt()
    a, b = grad.clone(), grad.clone()
    kernels.clip_scale_(a, total, 1.0)
    ops.clip_scale_torch_(b, total, 1.0)
    torch.testing.assert_close(a, b)


def test_sam_dropin_on_resnet18_flat_matches_foreach(monkeypatch):
    import fastflat
    from fastflat.data.models import build_model

    results = []
    for flat in (False, True):
        torch.manual_seed(0)
        model = build_model("resnet18", 3, 10, 32).cuda()
        if flat:
            fastflat.flatten(model)
        opt = fastflat.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
        x, y = torch.randn(32, 3, 32, 32, device="cuda"), torch.randint(0, 10, (32,), device="cuda")
        for _ in range(2):
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.first_step(zero_grad=True)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.second_step(zero_grad=True)
        results.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    torch.testing.assert_close(results[0], results[1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["sgd", "sam"])
def test_fp16_training_on_cuda_learns_and_keeps_bf16s_accuracy(tmp_path, method):
    """--amp fp16 end to end: the loss scale in the summary, and accuracy within 3 points of bf16."""
    from fastflat.config import load_config
    from fastflat.loop import train

    results = {}
    for amp in ("bf16", "fp16"):
        cfg = load_config(overrides={"dataset": "synthetic", "method": method, "amp": amp, "epochs": 3, "device": "cuda",
                                     "out": str(tmp_path), "name": f"{method}-{amp}"})
        results[amp] = train(cfg)
    assert results["fp16"]["loss_scale"] > 0 and "loss_scale" not in results["bf16"]
    assert results["fp16"]["test_acc"] > results["bf16"]["test_acc"] - 3.0
