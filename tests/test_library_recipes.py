"""docs/library.md's recipe, run as written: fastflat.SAM with an LR scheduler, bf16 autocast and
torch.compile, on a CPU (autocast to bf16 on the CPU here, "cuda" in docs/library.md)."""

import warnings

import torch
from torch import nn

import fastflat


def test_sam_with_a_scheduler_bf16_autocast_and_torch_compile():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3))
    loss_fn = nn.CrossEntropyLoss()
    x, y = torch.randn(64, 10), torch.randint(0, 3, (64,))
    loader, epochs = [(x[:32], y[:32]), (x[32:], y[32:])], 3
    fastflat.flatten(model)
    compiled = torch.compile(model)
    opt = fastflat.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)

    def closure():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_fn(compiled(xb), yb)
        loss.backward()
        return loss

    losses = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither the scheduler nor SAM may warn
        for _ in range(epochs):
            for xb, yb in loader:
                closure()
                losses.append(float(opt.step(closure).detach()))
                opt.zero_grad()
            scheduler.step()
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    assert opt.param_groups[0]["lr"] == scheduler.get_last_lr()[0] < 0.1
    flat = model[0].weight._fastflat_buffer
    assert flat is not None and flat.views_intact()  # compile and SAM kept the parameters in the buffer
