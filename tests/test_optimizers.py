"""--optimizer: any torch.optim class under every method, SAM over AdamW step for step as the public SAM
(davda54/sam) wrapping torch.optim.AdamW, and --no-decay-norm-bias as torch parameter groups would do it."""

import copy

import pytest
import torch
from torch import nn

from fastflat.cli import main
from fastflat.config import load_config, to_dict
from fastflat.errors import UserError
from fastflat.loop import build_trainer
from fastflat.loss.closures import BatchClosure
from fastflat.methods.optimizers import optimizer_class
from fastflat.runs.rundir import RunDir


class PublicSAM(torch.optim.Optimizer):
    """davda54/sam's SAM, restated: per-parameter e_w = rho g / (||g|| + 1e-12), old_p restored, base step."""

    def __init__(self, params, base_optimizer, rho=0.05, **kwargs):
        super().__init__(params, dict(rho=rho, **kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups

    @torch.no_grad()
    def first_step(self):
        grad_norm = torch.norm(torch.stack([p.grad.norm(p=2) for g in self.param_groups for p in g["params"]
                                            if p.grad is not None]), p=2)
        for group in self.param_groups:
            scale = group["rho"] / (grad_norm + 1e-12)
            for p in group["params"]:
                self.state[p]["old_p"] = p.data.clone()
                p.add_(p.grad * scale.to(p))
        self.zero_grad()

    @torch.no_grad()
    def second_step(self):
        for group in self.param_groups:
            for p in group["params"]:
                p.data = self.state[p]["old_p"]
        self.base_optimizer.step()
        self.zero_grad()


def _tiny(tmp_path, **overrides):
    return load_config(overrides={"dataset": "synthetic", "epochs": 1, "batch_size": 64, "out": str(tmp_path),
                                  "name": "run", **overrides})


def _batch(trainer):
    x, y = trainer.data.train.images[:64], trainer.data.train.labels[:64]
    return (x.float() / 255 - 0.5) / 0.25, y


def test_sam_over_adamw_matches_the_public_sam_wrapping_adamw_for_20_steps(tmp_path):
    cfg = _tiny(tmp_path, method="sam", optimizer="adamw", lr=1e-3, weight_decay=0.05, betas="0.9,0.99")
    trainer = build_trainer(cfg, RunDir.create(tmp_path, "t"))
    reference = copy.deepcopy(trainer.model)  # plain parameters: the copy owns its storage
    opt = PublicSAM(reference.parameters(), torch.optim.AdamW, rho=cfg.sam.rho, lr=1e-3, weight_decay=0.05,
                    betas=(0.9, 0.99))
    x, y = _batch(trainer)
    for _ in range(20):
        trainer.method.step(trainer.flat, BatchClosure(trainer.model, trainer.flat, x, y, "none"), lr=1e-3)
        nn.functional.cross_entropy(reference(x), y).backward()
        opt.first_step()
        nn.functional.cross_entropy(reference(x), y).backward()
        opt.second_step()
    ours = torch.cat([p.detach().reshape(-1) for p in trainer.model.parameters()])
    theirs = torch.cat([p.detach().reshape(-1) for p in reference.parameters()])
    assert isinstance(trainer.method.optimizer, torch.optim.AdamW)
    assert not torch.allclose(ours, torch.cat([p.reshape(-1) for p in build_trainer(
        cfg, RunDir.create(tmp_path, "u")).model.parameters()]).detach())  # it moved
    # AdamW divides by sqrt(v) + eps: where v is tiny, a last-bit difference in g (one flat reduction against
    # per-tensor ones, and the CPU's kernels) grows over 20 steps to ~5e-6 (seen on an Intel Xeon), while a
    # wrong decay or moment would differ by ~1e-4 and more
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_no_decay_norm_bias_equals_torch_param_groups_without_decay_on_1d_params(tmp_path, optimizer):
    cfg = _tiny(tmp_path, method="sgd", optimizer=optimizer, lr=0.01, weight_decay=0.1, decay_norm_bias=False)
    trainer = build_trainer(cfg, RunDir.create(tmp_path, "t"))
    reference = copy.deepcopy(trainer.model)
    matrices = [p for p in reference.parameters() if p.ndim >= 2]
    vectors = [p for p in reference.parameters() if p.ndim < 2]
    assert matrices and vectors  # the small CNN has both: convolutions, BatchNorm and biases
    kwargs = {"momentum": 0.9, "nesterov": True} if optimizer == "sgd" else {}  # the default SGD: Nesterov
    opt = optimizer_class(optimizer)([{"params": matrices, "weight_decay": 0.1}, {"params": vectors, "weight_decay": 0.0}],
                                     lr=0.01, **kwargs)
    x, y = _batch(trainer)
    for _ in range(5):
        trainer.method.step(trainer.flat, BatchClosure(trainer.model, trainer.flat, x, y, "none"), lr=0.01)
        opt.zero_grad()
        nn.functional.cross_entropy(reference(x), y).backward()
        opt.step()
    for (name, ours), theirs in zip(trainer.model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7, msg=name)


def test_optimizers_resolve_by_alias_any_case_and_module_path():
    assert optimizer_class("adamw") is torch.optim.AdamW and optimizer_class("SGD") is torch.optim.SGD
    assert optimizer_class("rmsprop") is torch.optim.RMSprop and optimizer_class("torch.optim:NAdam") is torch.optim.NAdam
    for bad in ("adamx", "torch.optim:Nope", "torch.nn:Linear", "lbfgs"):
        with pytest.raises(UserError):
            optimizer_class(bad)


def test_betas_come_from_the_command_line_yaml_and_python_alike(tmp_path):
    assert load_config(overrides={"betas": "0.8, 0.95"}).betas == (0.8, 0.95)
    assert load_config(overrides={"betas": [0.8, 0.95]}).betas == (0.8, 0.95)
    assert to_dict(load_config(overrides={"betas": (0.8, 0.95)}))["betas"] == [0.8, 0.95]  # YAML-safe


def test_bad_optimizer_settings_are_one_line_each_and_exit_2(tmp_path, capsys):
    code = main(["train", "--optimizer", "adamx", "--betas", "0.9", "--dataset", "synthetic", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "optimizer = 'adamx' is invalid" in err and "betas = '0.9' is invalid" in err
    assert "Traceback" not in err and not any(tmp_path.iterdir())


@pytest.mark.parametrize("method", ["sgd", "sam", "swa", "fge", "fullbatch"])
def test_every_gradient_method_trains_over_adamw(tmp_path, method):
    extra = {"fullbatch": ["--subset", "128", "--chunk-size", "64", "--epochs", "2"],
             "swa": ["--swa-start", "0.25", "--swa-cycle", "1"], "fge": ["--fge-cycle-epochs", "0.5"]}.get(method, [])
    code = main(["train", "--method", method, "--optimizer", "adamw", "--lr", "0.001", "--dataset", "synthetic",
                 "--subset", "256", "--batch-size", "32", "--epochs", "2", *extra, "--out", str(tmp_path), "--name", "r"])
    assert code == 0
    state = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=False)["method"]
    inner = state.get("inner", state)
    assert "exp_avg_sq" in str(inner["optimizer"]["state"][0].keys())  # Adam's second moment: AdamW took the steps
