"""Methods that wrap an inner method (SGD or SAM) and own the LR cycle: SWA, snapshot ensembles, FGE.

    SWA(cfg, SAM(cfg))     # SWA over SAM: the inner method takes the steps, the wrapper averages

Each formula is in fastflat.methods.schedules, next to its paper. Averages and collected members are part
of state_dict, so a run killed mid-cycle resumes to the same result. A budget that cannot deliver
what the method promises (SWA averaging fewer than 2 models, FGE collecting fewer than 2, fewer
snapshots than --sse-cycles) is refused at the start with the settings that would work.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from fastflat import ops
from fastflat.errors import UserError
from fastflat.flat import FlatParams
from fastflat.methods.base import Closure, Method, RunServices
from fastflat.methods.schedules import fge_triangular, pre_phase, snapshot_cosine, swa_cyclic
from fastflat.settings import setting

if TYPE_CHECKING:  # annotations only: the config is assembled above the methods
    from fastflat.config import TrainConfig

MIN_MODELS = 2  # an average or an ensemble of one model is that model: the method did nothing
AVERAGING = "SWA, snapshot ensembles, FGE"  # their options' help panel


@dataclass(frozen=True)
class SWAConfig:
    enabled: bool = setting(False, "Add SWA on top of --method (e.g. SWA over SAM); --method swa implies it.", option="swa")
    start: float = setting(0.75, "SWA starts: a fraction of the budget (< 1) or an epoch (>= 1).")
    lr: float = setting(0.01, "SWA learning rate alpha1 (the cycle maximum with --swa-lr-min).")
    lr_min: float | None = setting(None, "Cyclic SWA: the cycle minimum alpha2 (unset: a constant LR).")
    cycle: int = setting(0, "SWA cycle c in iterations; one average at each cycle's end (0 = a quarter epoch).")

    def check(self, cfg: Any, need: Any) -> None:
        need(self.start > 0, "start", "a fraction in (0, 1) or an epoch >= 1")
        need(self.start < 1 or self.start <= cfg.epochs, "start", f"must be <= epochs ({cfg.epochs})")
        need(self.lr > 0, "lr", "must be > 0")
        need(self.lr_min is None or 0 < self.lr_min <= self.lr, "lr_min", "must be in (0, swa.lr]")
        need(self.cycle >= 0, "cycle", "must be >= 0 (0 = a quarter epoch)")


@dataclass(frozen=True)
class SSEConfig:
    cycles: int = setting(2, "Snapshot ensembles: cosine restarts M over the budget, one snapshot at each one's end.")
    keep: int | str = setting(0, "Snapshot ensembles: ensemble the last k (0 = all; auto = the k best on --val-split).")

    def check(self, cfg: Any, need: Any) -> None:
        need(self.cycles >= 1, "cycles", "must be at least 1")
        need(self.keep == "auto" or (type(self.keep) is int and 0 <= self.keep <= self.cycles), "keep",
             f"a count in [0, sse.cycles = {self.cycles}] (0 = all), or auto")
        need(self.keep != "auto" or cfg.val_split > 0, "keep", "auto chooses k on a validation split: add --val-split 0.1")


@dataclass(frozen=True)
class FGEConfig:
    pretrain: float = setting(0.5, "FGE: share of the budget spent training before the cycles (0 with --init).")
    cycle_epochs: float = setting(0.5, "FGE: cycle length c in epochs (may be fractional; rounded to an even number of "
                                  "iterations); one model collected in each cycle's middle. Short budgets want short cycles.")
    lr_max: float = setting(0.05, "FGE: alpha1, the cycle's largest LR.")
    lr_min: float = setting(0.0005, "FGE: alpha2, the LR where models are collected.")

    def check(self, cfg: Any, need: Any) -> None:
        need(0 <= self.pretrain < 1, "pretrain", "must be in [0, 1)")
        need(self.cycle_epochs > 0, "cycle_epochs", "must be > 0")
        need(0 < self.lr_min <= self.lr_max, "lr_min", "must be in (0, fge.lr_max]")


class Wrapper(Method):
    """Delegates every hook of the protocol to `inner`; a subclass extends the hooks it needs (LR
    ownership, an average, collected members) and calls super() in each, so wrappers stack: SWA over
    Spartan over SAM runs every layer's hooks."""

    wraps = True
    panel = AVERAGING
    owns_lr = True
    whole_set_steps = property(lambda self: self.inner.whole_set_steps)  # facts of the method that steps
    splits_data = property(lambda self: self.inner.splits_data)
    holdout_salt = property(lambda self: self.inner.holdout_salt)

    def __init__(self, cfg: TrainConfig, inner: Method):
        super().__init__(cfg)
        self.inner = inner
        self.members: list[str] = []  # member files written so far (ensembles)

    def holdout(self) -> tuple[str, float] | None:
        return self.inner.holdout()

    def prepare_data(self, data: Any) -> Any:
        return self.inner.prepare_data(data)

    def check_data(self, train_size: int) -> None:
        self.inner.check_data(train_size)

    def init(self, flat: FlatParams, services: RunServices | None = None) -> None:
        self.inner.init(flat, services)
        self.services = services

    def step(self, flat: FlatParams, closure: Closure, lr: float) -> dict[str, Any]:
        return self.inner.step(flat, closure, lr)

    def lr(self, step: int, scheduled: float) -> float:
        return self.inner.lr(step, scheduled)

    def after_step(self, flat: FlatParams, steps_done: int) -> None:
        self.inner.after_step(flat, steps_done)

    def end_epoch(self, flat: FlatParams, epoch: int) -> None:
        self.inner.end_epoch(flat, epoch)

    def epoch_scores(self, flat: FlatParams) -> dict[str, float]:
        return self.inner.epoch_scores(flat)

    def evaluation_weights(self, flat: FlatParams):
        return self.inner.evaluation_weights(flat)

    def finish(self, flat: FlatParams) -> dict[str, Any]:
        return self.inner.finish(flat)

    def weights(self, flat: FlatParams) -> list[torch.Tensor]:
        return self.inner.weights(flat)

    def state_dict(self) -> dict[str, Any]:
        return {"inner": self.inner.state_dict(), "members": list(self.members)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state["inner"])
        self.members = list(state["members"])


class SWA(Wrapper):
    """Stochastic Weight Averaging (Izmailov et al. 2018): the pre-phase schedule until `start`, then
    constant or cyclic LR, and the running mean of the weights at the end of every cycle."""

    name = "swa"
    summary = "Stochastic weight averaging over --inner (or --swa over any method): the running mean of the weights."
    config = SWAConfig
    averages = True

    @classmethod
    def extension_problem(cls, cfg: TrainConfig) -> str | None:
        if cfg.swa.start >= 1 and cfg.schedule == "constant":
            return None
        return "SWA extends only when averaging starts at an epoch (--swa-start >= 1) after a constant pre-phase"

    def init(self, flat: FlatParams, services: RunServices | None = None) -> None:
        super().init(flat, services)
        swa, spe, total = self.cfg.swa, services.steps_per_epoch, services.total_steps
        self.start_step = round(swa.start * total) if swa.start < 1 else round(swa.start * spe)
        self.cycle = swa.cycle or max(1, spe // 4)
        self.planned = (total - self.start_step) // self.cycle  # averages at start + k * cycle <= total
        if self.planned < MIN_MODELS:
            fixes = []
            latest = total - MIN_MODELS * self.cycle  # the last start step that still averages 2 models
            if latest >= 1:
                fixes.append(f"--swa-start {math.floor(1000 * latest / total) / 1000:g}")
            if (total - self.start_step) // MIN_MODELS >= 1:
                fixes.append(f"--swa-cycle {(total - self.start_step) // MIN_MODELS}")
            if swa.start >= 1:  # an epoch-based start stays put: more epochs make room after it
                fixes.append(f"--epochs {math.ceil((self.start_step + MIN_MODELS * self.cycle) / spe)}")
            raise UserError(f"SWA would average {self.planned} model(s): averaging starts at step {self.start_step} of "
                            f"{total} and takes one every {self.cycle} steps (swa.cycle); use "
                            f"{' or '.join(fixes) or 'more --epochs'}")
        self.pre = pre_phase(self.cfg.lr, swa.lr, self.start_step)
        self.cyclic = swa_cyclic(swa.lr, swa.lr_min if swa.lr_min is not None else swa.lr, self.cycle)
        self.average = [torch.zeros_like(w) for w in flat.params]  # (N,) per group
        self.count = torch.zeros((), dtype=torch.long, device=flat.params[0].device)  # models averaged

    def lr(self, step: int, scheduled: float) -> float:
        return self.pre(step) if step < self.start_step else self.cyclic(step - self.start_step)

    def after_step(self, flat: FlatParams, steps_done: int) -> None:
        super().after_step(flat, steps_done)
        since = steps_done - self.start_step
        if since > 0 and since % self.cycle == 0:  # last iteration of a cycle: alpha = alpha2
            ops.average_(self.average, flat.params, self.count, None)
            self.count += 1

    def weights(self, flat: FlatParams) -> list[torch.Tensor]:
        return self.average if int(self.count) > 0 else flat.params

    def finish(self, flat: FlatParams) -> dict[str, Any]:
        """Evaluate the SWA weights (BatchNorm re-estimated for them), then put the SGD weights back."""
        inner = super().finish(flat)  # what the wrapped method delivers (Spartan's rounds, ...), first
        model = flat.model
        saved = {k: v.clone() for k, v in model.state_dict().items()}
        flat.copy_params_(self.weights(flat))  # the average: what this method offers as its model
        self.services.update_bn()
        result = {f"swa_{k}": v for k, v in self.services.evaluate().items()}
        result["swa_checkpoint"] = self.services.save_member("swa")
        model.load_state_dict(saved)
        return {**inner, **result, "swa_models_averaged": int(self.count), "delivers": "swa"}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "average": self.average, "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        for a, saved in zip(self.average, state["average"]):
            a.copy_(saved)
        self.count.copy_(state["count"])


class SnapshotEnsemble(Wrapper):
    """Snapshot ensembles (Huang et al. 2017): M cosine cycles, a snapshot at the end of each."""

    name = "sse"
    summary = "Snapshot ensembles: cosine restarts, one member at the end of each cycle."
    config = SSEConfig
    swa_refusal = "snapshot ensembles set their own learning rate, as SWA does: use one or the other"

    @classmethod
    def extension_problem(cls, cfg: TrainConfig) -> str | None:
        return "a snapshot ensemble's cycles divide the old budget"

    def init(self, flat: FlatParams, services: RunServices | None = None) -> None:
        super().init(flat, services)
        total, cycles = services.total_steps, self.cfg.sse.cycles
        self.period = math.ceil(total / cycles)
        snapshots = math.ceil(total / self.period)  # one at each period's end, and one at the last step
        if snapshots != cycles:
            most = max(m for m in range(1, cycles + 1) if math.ceil(total / math.ceil(total / m)) == m)
            raise UserError(f"sse.cycles = {cycles} cannot fit {total} steps ({self.cfg.epochs} epochs x "
                            f"{services.steps_per_epoch}): cycles of {self.period} steps give {snapshots} snapshots; "
                            f"use --sse-cycles {most}, or more --epochs")
        self.schedule = snapshot_cosine(self.cfg.lr, total, cycles)

    def lr(self, step: int, scheduled: float) -> float:
        return self.schedule(step)

    def after_step(self, flat: FlatParams, steps_done: int) -> None:
        super().after_step(flat, steps_done)
        if steps_done % self.period == 0 or steps_done == self.services.total_steps:
            self.members.append(self.services.save_member(f"snapshot-{len(self.members) + 1:02d}"))

    def finish(self, flat: FlatParams) -> dict[str, Any]:
        if not self.members:  # --max-steps stopped the run before the first snapshot (the trainer says so)
            return {"ensemble": None, "ensemble_members": 0}
        keep = self.cfg.sse.keep
        if keep == "auto":  # the k whose last-k ensemble is best on the validation split, never the test set
            keep = self.services.validation_best_k(self.members)
        keep = keep or len(self.members)
        return {"ensemble": self.services.evaluate_ensemble(self.members[-keep:]), "sse_keep": keep}


class FGE(Wrapper):
    """Fast Geometric Ensembling (Garipov et al. 2018): after pretraining (or --init), triangular
    cycles of c epochs; a model collected at each cycle's middle (the LR minimum), BatchNorm
    re-estimated for it."""

    name = "fge"
    summary = "Fast geometric ensembling: short triangular LR cycles, one member at each cycle's minimum."
    config = FGEConfig
    swa_refusal = "FGE sets its own learning rate, as SWA does: use one or the other"

    @classmethod
    def extension_problem(cls, cfg: TrainConfig) -> str | None:
        return None if cfg.init else "FGE extends only when started from --init (its pretraining is a share of the budget)"

    def init(self, flat: FlatParams, services: RunServices | None = None) -> None:
        super().init(flat, services)
        fge, spe, total = self.cfg.fge, services.steps_per_epoch, services.total_steps
        self.start_step = 0 if self.cfg.init else round(fge.pretrain * total)  # in steps: never rounded to 0 epochs
        self.cycle = max(2, 2 * round(fge.cycle_epochs * spe / 2))  # c iterations, even: t = 1/2 is a step
        self.planned = fge_collections(total - self.start_step, self.cycle)
        if self.planned < MIN_MODELS:
            after = total - self.start_step
            cycle_fit = max(2, 2 * (after // (2 * MIN_MODELS)))  # 2 middles: 1.5 cycles must fit in `after`
            raise UserError(f"FGE would collect {self.planned} model(s): {after} steps after {self.start_step} of "
                            f"pretraining, cycles of {self.cycle} steps, one model each cycle's middle; use "
                            f"--fge-cycle-epochs {cycle_fit / spe:.3g}, a smaller --fge-pretrain, or more --epochs")
        self.pre = pre_phase(self.cfg.lr, fge.lr_max, self.start_step)
        self.triangle = fge_triangular(fge.lr_max, fge.lr_min, self.cycle)

    def lr(self, step: int, scheduled: float) -> float:
        return self.pre(step) if step < self.start_step else self.triangle(step - self.start_step)

    def after_step(self, flat: FlatParams, steps_done: int) -> None:
        super().after_step(flat, steps_done)
        since = steps_done - self.start_step
        if since > 0 and since % self.cycle == self.cycle // 2:  # t(i) = 1/2: alpha = alpha2
            self.services.update_bn()
            self.members.append(self.services.save_member(f"fge-{len(self.members) + 1:02d}"))

    def finish(self, flat: FlatParams) -> dict[str, Any]:
        if not self.members:  # --max-steps stopped the run before the first collection (the trainer says so)
            return {"ensemble": None, "ensemble_members": 0}
        return {"ensemble": self.services.evaluate_ensemble(self.members)}


def fge_collections(steps: int, cycle: int) -> int:
    """Models FGE collects in `steps` steps of cycles of `cycle` (even) steps: one at each middle."""
    return 0 if steps < cycle // 2 else (steps - cycle // 2) // cycle + 1
