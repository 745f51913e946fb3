"""`fastflat bench train`: steps/s of each training method on one synthetic CIFAR-shaped batch (3x32x32).

    rows = run_train(TrainSettings(model="resnet18", methods=["sgd", "sam"], steps=20, batch_size=128))

Each method gets a fresh model (same seed), the trainer's own closures and its real `train_step`, and is
timed two ways in the same run: whole steps, and forward+backward passes alone. What a step costs
beyond its passes (step - passes x fwd_bwd) is the method's own work: norms, perturb, restore,
optimizer. SAM takes two passes, so its ideal step time is 2.0x SGD's. SWA averages after every step
here (cycle of one step, its worst case; ideal 1.0x SGD); Spartan's steps are its inner SGD's, and one
mutation round (K children scored on the batch, then the fused ES update) is timed on its own.
Under torchrun (`--nproc N`), `ddp-sgd` and `ddp-sam` time stock DistributedDataParallel on the same
model and rank shares (torch.optim.SGD; fastflat.SAM with the ascent inside no_sync(), the docs/library.md
recipe): the baseline for our one all-reduce of the flat gradient per step.
The SAM family's rows (`gsam` ... `sam-from0.8`: SAM_FAMILY_ROWS) take a different number of passes on
different steps (LookSAM's SAM step every 5th, a schedule's plain steps), so their step_ms is the mean
over the timed steps, whole cycles of them, not the median: what an epoch costs per step.
Full batch (`fullbatch`, `fullbatch-finite`, `fullbatch-exact`: the gradient-norm penalty off, by
finite differences, by double backward) steps over FULL_BATCHES batches at once; `ratio_to_sgd` is per
batch of data, i.e. against an SGD epoch over the same batches (ideal: 1.0, 2.0 with the penalty).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from fastflat.ops import dist
from fastflat.config import TrainConfig
from fastflat.flat import flatten
from fastflat.methods import build_method, registry
from fastflat.methods.averaging import EMAConfig, LAWAConfig
from fastflat.methods.fullbatch import FullBatchConfig
from fastflat.methods.sam import SAMConfig
from fastflat.methods.wrappers import SWAConfig
from fastflat.data.models import build_model
from fastflat.loss.closures import BatchClosure, SplitClosure
from fastflat.loop.steps import train_step

IMAGE_SHAPE, NUM_CLASSES = (3, 32, 32), 10
FULL_BATCHES = 8  # batches in one full-batch step (its "training set")
FULL_BATCH_VARIANTS = {"fullbatch": "off", "fullbatch-finite": "finite", "fullbatch-exact": "exact"}
SAM_FAMILY_ROWS = {  # row name -> --method sam settings (docs/results.md "Which SAM?")
    "gsam": {"variant": "gsam"}, "fsam": {"variant": "fsam"}, "wsam": {"variant": "wsam"}, "msam": {"variant": "msam"},
    "esam": {"variant": "esam"}, "looksam": {"variant": "looksam", "looksam_k": 5}, "sam-on": {"only": "norm"},
    "sam-every5": {"every": 5}, "sam-prob0.2": {"prob": 0.2}, "sam-from0.8": {"start": 0.8},
}
TRAIN_FIELDS = ("method", "model", "batch_size", "batches_per_step", "steps", "params", "status", "reason", "step_ms", "iqr_ms",
                "steps_per_s", "samples_per_s", "fwd_bwd_ms", "passes_per_step", "outside_fwd_bwd_ms",
                "ratio_to_sgd", "round_ms")


@dataclass
class TrainSettings:
    model: str
    methods: list[str]
    steps: int = 20  # timed steps per method (and timed forward+backward passes)
    batch_size: int = 128
    warmup: int = 3  # untimed steps (and passes) first: cuDNN autotuning, allocator, lazy init
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


class CountingClosure:
    """Passes calls through to a BatchClosure, counting forward passes (SAM takes two per step)."""

    def __init__(self, closure: BatchClosure | SplitClosure, passes_per_call: int = 1):
        self.closure, self.batch_size, self.calls = closure, closure.batch_size, 0
        self.passes_per_call = passes_per_call  # a SplitClosure call is one pass per chunk

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        part = kwargs.get("part")
        self.calls += 1 if part is not None else self.passes_per_call
        return self.closure(*args, **kwargs)

    def selected(self, chosen: torch.Tensor, update_bn: bool = False) -> torch.Tensor:  # ESAM's partial pass
        self.calls += 1
        return self.closure.selected(chosen, update_bn)

    def __getattr__(self, name: str) -> Any:  # chunks, x, y, amp: what methods read of a closure
        return getattr(self.closure, name)


def times_ms(fn: Callable[[], None], n: int, device: torch.device) -> list[float]:
    """Wall time of each of n calls, synchronised on both sides so a call owns its GPU work."""
    times = []
    for _ in range(n):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def median_iqr(times: list[float]) -> tuple[float, float]:
    q25, q50, q75 = torch.tensor(times, dtype=torch.float64).quantile(
        torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)).tolist()
    return q50, q75 - q25


class BenchServices:
    """What methods ask of the trainer, reduced to the one synthetic batch (methods.RunServices)."""

    steps_per_epoch, total_steps = 1, 10**9  # cycles of one step: SWA averages after every step

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.batches = [(x, y)]

    def update_bn(self) -> None: ...
    def evaluate(self) -> dict[str, float]:
        return {}

    def save_member(self, tag: str) -> str:
        return tag

    def evaluate_ensemble(self, paths: list[str]) -> dict[str, Any]:
        return {}

    def holdout_batches(self, purpose: str, limit: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return self.batches

    def log_event(self, record: dict[str, Any]) -> None: ...


def _bench_method(name: str, settings: TrainSettings, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    torch.manual_seed(0)
    model = build_model(settings.model, IMAGE_SHAPE[0], NUM_CLASSES, IMAGE_SHAPE[1]).to(settings.device)
    model.train()
    flat = flatten(model)  # after .to(): moving re-creates parameters
    gradreg, family = FULL_BATCH_VARIANTS.get(name), SAM_FAMILY_ROWS.get(name)
    cfg = TrainConfig(method="fullbatch" if gradreg else "sam" if family is not None else name, model=settings.model,
                      batch_size=settings.batch_size, sam=SAMConfig(**(family or {})),
                      swa=SWAConfig(start=1, cycle=1),  # an average after every step (cycles of one step)
                      ema=EMAConfig(decay=0.999 if name == "ema" else 0.0),  # over SGD, one update a step
                      lawa=LAWAConfig(k=5 if name == "lawa" else 0),  # a checkpoint every step: the worst case
                      fullbatch=FullBatchConfig(chunk_size=settings.batch_size, gradreg=gradreg or "off"))
    method = build_method(cfg)
    services = BenchServices(x, y)
    if family is not None:  # the run is the timed steps: --sam-from 0.8 ascends on their last fifth
        services.steps_per_epoch = services.total_steps = settings.warmup + settings.steps
    method.init(flat, services)
    passes, done = [], [0]

    def new_closure() -> CountingClosure:
        if gradreg:  # the same batch FULL_BATCHES times: one full-batch step over that much data
            return CountingClosure(SplitClosure(model, flat, [(x, y)] * FULL_BATCHES, cfg.amp), FULL_BATCHES)
        return CountingClosure(BatchClosure(model, flat, x, y, cfg.amp))

    def step() -> None:
        closure = new_closure()
        train_step(method, flat, closure, cfg.lr, done[0])  # the trainer's own step
        done[0] += 1
        passes.append(closure.calls)

    def fwd_bwd() -> None:
        BatchClosure(model, flat, x, y, cfg.amp)(backward=True)

    times_ms(step, settings.warmup, settings.device)
    times_ms(fwd_bwd, settings.warmup, settings.device)
    fwd_bwd_ms, _ = median_iqr(times_ms(fwd_bwd, settings.steps, settings.device))
    step_times = times_ms(step, settings.steps, settings.device)
    step_ms, iqr_ms = median_iqr(step_times)
    passes_per_step = passes[-1]
    if family is not None:  # steps of unequal cost: what an epoch pays per step is their mean
        step_ms, passes_per_step = sum(step_times) / len(step_times), sum(passes[-settings.steps:]) / settings.steps
    round_ms = None
    if hasattr(method, "mutate"):  # Spartan: one mutation round, timed apart from the steps
        round_ms, _ = median_iqr(times_ms(lambda: method.mutate(flat, 0), max(2, settings.steps // 5), settings.device))
    batches = FULL_BATCHES if gradreg else 1
    return {"params": flat.numel, "status": "ok", "round_ms": round_ms, "step_ms": step_ms, "iqr_ms": iqr_ms,
            "batches_per_step": batches,
            "steps_per_s": 1e3 / step_ms, "samples_per_s": batches * settings.batch_size * 1e3 / step_ms,
            "fwd_bwd_ms": fwd_bwd_ms, "passes_per_step": passes_per_step,
            "outside_fwd_bwd_ms": step_ms - passes_per_step * fwd_bwd_ms}


DDP_VARIANTS = ("ddp-sgd", "ddp-sam")  # stock DistributedDataParallel, for comparison under torchrun


def _bench_ddp(name: str, settings: TrainSettings, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    """A user's own DDP loop on the same model and batch share: the baseline for our flat all-reduce."""
    from torch.nn.functional import cross_entropy
    from torch.nn.parallel import DistributedDataParallel

    from fastflat.optim import SAM

    torch.manual_seed(0)
    model = build_model(settings.model, IMAGE_SHAPE[0], NUM_CLASSES, IMAGE_SHAPE[1]).to(settings.device)
    ddp = DistributedDataParallel(model, device_ids=[settings.device] if settings.device.type == "cuda" else None)
    cfg = TrainConfig()
    kwargs = dict(lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    opt = SAM(ddp.parameters(), torch.optim.SGD, rho=cfg.sam.rho, **kwargs) if name == "ddp-sam" else \
        torch.optim.SGD(ddp.parameters(), **kwargs)

    def step() -> None:
        if name == "ddp-sam":
            with ddp.no_sync():
                cross_entropy(ddp(x), y).backward()
            opt.first_step(zero_grad=True)
            cross_entropy(ddp(x), y).backward()
            opt.second_step(zero_grad=True)
        else:
            cross_entropy(ddp(x), y).backward()
            opt.step()
            opt.zero_grad()

    times_ms(step, settings.warmup, settings.device)
    step_ms, iqr_ms = median_iqr(times_ms(step, settings.steps, settings.device))
    params = sum(p.numel() for p in model.parameters())
    return {"params": params, "status": "ok", "step_ms": step_ms, "iqr_ms": iqr_ms, "batches_per_step": 1,
            "steps_per_s": 1e3 / step_ms, "samples_per_s": settings.batch_size * 1e3 / step_ms,
            "passes_per_step": 2 if name == "ddp-sam" else 1}


def run_train(settings: TrainSettings, on_method: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """One row of TRAIN_FIELDS per method; names fastflat does not know are 'unavailable'."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(settings.batch_size, *IMAGE_SHAPE, generator=generator).to(settings.device)
    y = torch.randint(0, NUM_CLASSES, (settings.batch_size,), generator=generator).to(settings.device)
    share = settings.batch_size // dist.world_size()  # torchrun: each rank its share of the batch,
    x, y = x[dist.rank() * share : (dist.rank() + 1) * share], y[dist.rank() * share : (dist.rank() + 1) * share]
    rows = []
    for name in settings.methods:
        row = {**dict.fromkeys(TRAIN_FIELDS), "processes": dist.world_size(), "method": name, "model": settings.model,
               "batch_size": settings.batch_size, "steps": settings.steps}
        known = [*registry(), *FULL_BATCH_VARIANTS, *SAM_FAMILY_ROWS, *DDP_VARIANTS]
        if name not in known:
            row.update(status="unavailable", reason=f"not a fastflat method ({', '.join(known)})")
        elif name in DDP_VARIANTS and not dist.active():
            row.update(status="unavailable", reason="stock DDP needs a process group: run with --nproc 2 or more")
        else:
            if on_method is not None:
                on_method(name)
            row.update((_bench_ddp if name in DDP_VARIANTS else _bench_method)(name, settings, x, y))
        rows.append(row)
    sgd = next((r for r in rows if r["method"] == "sgd" and r["status"] == "ok"), None)
    for r in rows:
        if sgd is not None and r["status"] == "ok":
            r["ratio_to_sgd"] = r["step_ms"] / (r["batches_per_step"] * sgd["step_ms"])  # per batch of data
    return rows
