"""The README's recipe, run by tests/test_distributed.py: fastflat.SAM inside a user's own DDP loop.

    torchrun --standalone --nproc-per-node 2 tests/workers/sam_ddp_loop.py OUT [flat | family]
    python tests/workers/sam_ddp_loop.py OUT reference      # the same steps in one process, plain torch

Each rank ascends with its own gradient (the first backward inside no_sync(): m-sharpness with m = the
per-rank batch, the SAM paper's setup); the second backward is DDP's, averaged over the ranks. The
reference computes exactly that in one process, half batch by half batch, without fastflat or DDP.
"""

import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.functional import cross_entropy

import fastflat

STEPS, BATCH, RHO, LR = 5, 64, 0.05, 0.1


def batches():
    g = torch.Generator().manual_seed(0)
    for _ in range(STEPS):
        x = torch.randn(BATCH, 12, generator=g)
        yield x, (x[:, :4] * 3).argmax(1)


def mlp():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 4))


def ddp_loop(out: str, flat: bool) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = mlp()
    if flat:
        fastflat.flatten(model)  # one flat buffer: the one-launch SAM path; DDP wraps it as any model
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = fastflat.SAM(ddp.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=0.9)
    for x, y in batches():
        x, y = x.chunk(world)[rank], y.chunk(world)[rank]  # this rank's share of the global batch
        with ddp.no_sync():  # the ascent: this rank's own gradient, no all-reduce
            cross_entropy(ddp(x), y).backward()
        opt.first_step(zero_grad=True)
        cross_entropy(ddp(x), y).backward()  # at w + e: DDP averages these gradients over the ranks
        opt.second_step(zero_grad=True)
    torch.save([p.detach().clone() for p in model.parameters()], f"{out}/rank{rank}.pt")
    leave()


def family_loop(out: str) -> None:
    """FriendlySAM, LookSAM (k = 2) and WSAM in the same loop, each from the same start: the ranks must end equal."""
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    for name in ("FriendlySAM", "LookSAM", "WSAM"):
        model = mlp()
        fastflat.flatten(model)
        ddp = nn.parallel.DistributedDataParallel(model)
        cls = getattr(fastflat, name)
        args = (model, ddp.parameters()) if name == "WSAM" else (ddp.parameters(),)
        opt = cls(*args, torch.optim.SGD, rho=RHO, lr=LR, momentum=0.9, **({"k": 2} if name == "LookSAM" else {}))
        for x, y in batches():
            x, y = x.chunk(world)[rank], y.chunk(world)[rank]
            if name == "LookSAM" and not opt.full_step():  # one pass: DDP's averaged gradient
                cross_entropy(ddp(x), y).backward()
                opt.second_step(zero_grad=True)
                continue
            with ddp.no_sync():
                cross_entropy(ddp(x), y).backward()
            opt.first_step(zero_grad=True)
            cross_entropy(ddp(x), y).backward()
            opt.second_step(zero_grad=True)
        torch.save([p.detach().clone() for p in model.parameters()], f"{out}/{name}-rank{rank}.pt")
    leave()


def leave() -> None:
    """Both ranks reach the end before either tears gloo down: once, rank 0 aborted in the teardown
    ("terminate called without an active exception") while rank 1 was still leaving."""
    dist.barrier()
    dist.destroy_process_group()


def reference(out: str, world: int = 2) -> None:
    model = mlp()
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=LR, momentum=0.9)
    for x, y in batches():
        total = [torch.zeros_like(p) for p in params]
        for xs, ys in zip(x.chunk(world), y.chunk(world)):
            grads = torch.autograd.grad(cross_entropy(model(xs), ys), params)
            norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))
            with torch.no_grad():
                e = [RHO * g / (norm + 1e-12) for g in grads]
                for p, d in zip(params, e):
                    p.add_(d)
            perturbed = torch.autograd.grad(cross_entropy(model(xs), ys), params)
            with torch.no_grad():
                for p, d in zip(params, e):
                    p.sub_(d)
            for t, g in zip(total, perturbed):
                t.add_(g / world)
        for p, t in zip(params, total):
            p.grad = t
        opt.step()
    torch.save([p.detach().clone() for p in params], f"{out}/reference.pt")


if __name__ == "__main__":
    mode = sys.argv[2] if len(sys.argv) > 2 else "plain"
    if mode == "reference":
        reference(sys.argv[1])
    elif mode == "family":
        family_loop(sys.argv[1])
    else:
        ddp_loop(sys.argv[1], flat=mode == "flat")
