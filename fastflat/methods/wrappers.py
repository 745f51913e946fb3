"""Methods that wrap an inner method (SGD or SAM) and own the LR cycle: SWA, snapshot ensembles, FGE.

    SWA(cfg, SAM(cfg))     # SWA over SAM: the inner method takes the steps, the wrapper averages

Each formula is in fastflat.methods.schedules, next to its paper. Averages and collected members are part
of state_dict, so a run killed mid-cycle resumes to the same result. A budget that cannot deliver
what the method promises (SWA averaging fewer than 2 models, FGE collecting fewer than 2, fewer
snapshots than --sse-cycles) is refused at the start with the settings that would work.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from fastflat import ops
from fastflat.errors import UserError
from fastflat.flat import FlatParams
from fastflat.methods.base import Closure, Method, RunServices
from fastflat.methods.schedules import fge_triangular, pre_phase, snapshot_cosine, swa_cyclic

if TYPE_CHECKING:  # annotations only: the config is assembled above the methods
    from fastflat.config import TrainConfig

MIN_MODELS = 2  # an average or an ensemble of one model is that model: the method did nothing


class Wrapper(Method):
    """Delegates the step to `inner`; subclasses add LR ownership and collection."""

    def __init__(self, cfg: TrainConfig, inner: Method):
        super().__init__(cfg)
        self.inner = inner
        self.members: list[str] = []  # member files written so far (ensembles)

    def init(self, flat: FlatParams, services: RunServices | None = None) -> None:
        self.inner.init(flat, services)
        self.services = services

    def step(self, flat: FlatParams, closure: Closure, lr: float) -> dict[str, Any]:
        return self.inner.step(flat, closure, lr)

    def state_dict(self) -> dict[str, Any]:
        return {"inner": self.inner.state_dict(), "members": list(self.members)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state["inner"])
        self.members = list(state["members"])


class SWA(Wrapper):
    """Stochastic Weight Averaging (Izmailov et al. 2018): the pre-phase schedule until `start`, then
    constant or cyclic LR, and the running mean of the weights at the end of every cycle."""

    name = "swa"

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
        since = steps_done - self.start_step
        if since > 0 and since % self.cycle == 0:  # last iteration of a cycle: alpha = alpha2
            ops.average_(self.average, flat.params, self.count, None)
            self.count += 1

    def weights(self, flat: FlatParams) -> list[torch.Tensor]:
        return self.average if int(self.count) > 0 else flat.params

    def finish(self, flat: FlatParams) -> dict[str, Any]:
        """Evaluate the SWA weights (BatchNorm re-estimated for them), then put the SGD weights back."""
        model = flat.model
        saved = {k: v.clone() for k, v in model.state_dict().items()}
        flat.copy_params_(self.weights(flat))  # the average: what this method offers as its model
        self.services.update_bn()
        result = {f"swa_{k}": v for k, v in self.services.evaluate().items()}
        result["swa_checkpoint"] = self.services.save_member("swa")
        model.load_state_dict(saved)
        return {**result, "swa_models_averaged": int(self.count)}

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
