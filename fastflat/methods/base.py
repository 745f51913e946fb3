"""The Method protocol every training method implements, and the shared base-optimizer update.

The trainer owns batches, schedule, evaluation and checkpoints; a method owns how one batch moves
the weights. Weights and gradients arrive as a FlatParams, so a method's math is over (N,) vectors.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
from torch import Tensor

from fastflat import ops

from fastflat.ops import dist
from fastflat.errors import NonFiniteError
from fastflat.errors import finite_or_raise
from fastflat.flat import FlatParams
from fastflat.methods.optimizers import build_optimizer, decay_, schedule_free, schedule_free_evaluation

if TYPE_CHECKING:  # annotations only: the config is assembled above the methods
    from fastflat.config import TrainConfig

MAX_OVERFLOWS_IN_A_ROW = 40  # --amp fp16: the scale halves each time (2^16 -> 2^-24); beyond that it is not overflow


class Closure(Protocol):
    """Loss on the current batch at the current weights; the trainer builds one per batch.

    backward=True zeroes the flat gradient in place, then fills it. `part` restricts the pass to a
    slice of the batch (m-sharpness). update_bn=False keeps BatchNorm running statistics unchanged
    (SAM's perturbed pass). Returns the mean loss as a detached 0-dim tensor (no host sync).
    """

    batch_size: int
    amp: str  # the autocast mode its passes run under ("none" | "bf16" | "fp16")
    chunks: list[tuple[Tensor, Tensor]]  # its data as (x (B, C, H, W), y (B,)) chunks: one for a batch

    example_losses: Tensor | None  # (B,) each example's loss of the last pass called with keep_losses=True

    def block(self, part: slice) -> tuple[Tensor, Tensor]: ...  # (x, y) of examples part (inside one chunk)

    def losses(self) -> Tensor: ...  # (B,) each example's loss at the current weights, no gradient (ESAM)

    def selected(self, chosen: Tensor, update_bn: bool = False) -> Tensor: ...  # gradient of the chosen ones' mean

    def __call__(self, backward: bool = True, part: slice | None = None, update_bn: bool = True,
                 keep_losses: bool = False) -> Tensor: ...


class RunServices(Protocol):
    """What the trainer offers a method beyond the batch: the budget, and work that needs the data."""

    steps_per_epoch: int
    total_steps: int
    resuming: bool  # the method's state will come from a checkpoint (load_state_dict) after init
    scaler: torch.amp.GradScaler | None  # --amp fp16: the closures' gradients arrive times its scale

    def update_bn(self) -> None: ...  # re-estimate BatchNorm statistics at the current weights
    def holdout_batches(self, purpose: str, limit: int = 0) -> list[tuple[Tensor, Tensor]]: ...  # split from holdout()
    def evaluate(self) -> dict[str, float]: ...  # test loss/accuracy at the current weights
    def save_member(self, tag: str) -> str: ...  # current model as an ensemble member file; its path
    def evaluate_ensemble(self, paths: list[str]) -> dict[str, Any]: ...  # members loaded one at a time
    def validation_best_k(self, paths: list[str]) -> int: ...  # best last-k ensemble on --val-split
    def log_event(self, record: dict[str, Any]) -> None: ...  # one line of evolution.jsonl
    def point_weights(self, path: str) -> tuple[dict[str, Any], list[Tensor]]: ...  # a run's config, its weights as flat vectors


class Method:
    """Base class: a plain gradient step with the base optimizer (--optimizer, SGD by default) on flat
    vectors, plus clipping.

    The optimizer sees one tensor per (device, dtype) group, so its step is a handful of launches
    whatever the model, and its state (momentum, Adam's moments) is one vector too.
    """

    # -- facts the config, the CLI and the trainer ask of the class; nothing outside methods/ compares names --
    name: ClassVar[str] = "base"  # --method NAME
    summary: ClassVar[str] = ""  # one line: what it does (the docs' methods table, `fastflat train --help`)
    config: ClassVar[type | None] = None  # its settings: a frozen dataclass of settings.setting fields, the section
    #                                       `section or name` of TrainConfig (cfg.sam.rho, YAML `sam:`, --rho)
    section: ClassVar[str | None] = None  # share another method's section instead (es reads spartan's)
    panel: ClassVar[str] = "Method"  # the --help panel of its options
    defaults: ClassVar[dict[str, Any]] = {}  # general settings whose default it changes (fullbatch: Nesterov)
    settings_need_method: ClassVar[bool] = False  # its section may be given only with --method NAME
    owns_lr: ClassVar[bool] = False  # sets the learning rate itself: --schedule / --warmup-epochs are refused
    wraps: ClassVar[bool] = False  # wraps the method named by --inner (swa, sse, fge, spartan)
    inner_ok: ClassVar[bool] = False  # may be a wrapper's --inner
    batched: ClassVar[bool] = True  # steps on batches: --accumulate applies
    fp16: ClassVar[bool] = True  # --amp fp16 (a loss-scaled gradient) applies
    splits_data: ClassVar[bool] = True  # torchrun: each rank takes its share of every batch (False: all of it)
    whole_set_steps: ClassVar[bool] = False  # one step is one pass over the whole training set (an epoch = 1 step)
    holdout_salt: ClassVar[str | None] = None  # seeds holdout()'s split (None: its purpose)
    swa_refusal: ClassVar[str | None] = None  # why --swa cannot average this method (None: it can)
    average_refusal: ClassVar[str | None] = None  # why --ema / --lawa cannot average this method (None: they can)
    schedule_free_refusal: ClassVar[str | None] = None  # why a schedule-free --optimizer cannot drive it
    averages: ClassVar[bool] = False  # delivers an average of its weights (SWA, EMA): no second average over it

    @classmethod
    def settings_key(cls) -> str:
        """Its section of TrainConfig: `section`, else its name as an identifier (example-sgd -> example_sgd)."""
        return cls.section or cls.name.replace("-", "_")

    @classmethod
    def check_config(cls, cfg: TrainConfig, need: Callable[[bool, str, str], None]) -> None:
        """Checks of the whole config when this method is chosen (as --method or --inner): each failure
        as need(False, dotted key, what is allowed). A section's own ranges are its dataclass's check()."""

    @classmethod
    def extension_problem(cls, cfg: TrainConfig) -> str | None:
        """Why a run of this method cannot be extended to more epochs (None: it can). Extending must not
        change the LR of any step already taken, so the LR may not depend on the total budget."""
        if cfg.schedule == "constant" and not cfg.warmup_epochs:
            return None
        return f"its {cfg.schedule} schedule spans the old budget (only --schedule constant runs extend)"

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.optimizer: torch.optim.Optimizer | None = None
        self.scaler: torch.amp.GradScaler | None = None
        self.overflows_in_a_row = 0  # --amp fp16: steps skipped in a row because the gradient overflowed
        self.decay_masks: list[Tensor] | None = None  # --no-decay-norm-bias: (N,) 0/1 per flat vector

    def holdout(self) -> tuple[str, float] | None:
        """(purpose, fraction) of the training set this method needs held out of SGD, or None.
        The trainer splits it off (seeded by purpose) and serves it as services.holdout_batches."""
        return None

    def prepare_data(self, data: Any) -> Any:
        """The training data as this method trains on it (a fastflat.data.Dataset); the default keeps it."""
        return data

    def check_data(self, train_size: int) -> None:
        """Refuse (UserError) a training set this method cannot use, before any work."""

    def init(self, flat: FlatParams, services: RunServices | None = None) -> None:
        self.services = services
        self.scaler = getattr(services, "scaler", None)
        self.optimizer = self.make_optimizer(flat.params, flat)
        self.flat = flat
        self.train_weights: list[Tensor] | None = None  # schedule-free: y, while the model holds x
        if schedule_free(self.optimizer):
            self.optimizer.train()  # it steps only in train mode; evaluation_weights switches it

    @contextlib.contextmanager
    def evaluation_weights(self, flat: FlatParams) -> Iterator[None]:
        """Inside: the weights that evaluation and checkpoints see. The current ones, except under a
        schedule-free optimizer: its average x, BatchNorm recomputed for it (re-entrant: a checkpoint
        inside an evaluation switches once)."""
        if not schedule_free(getattr(self, "optimizer", None)) or self.train_weights is not None:
            yield
            return
        with schedule_free_evaluation(self.optimizer, flat.params, flat.model, self.services.update_bn) as saved:
            self.train_weights, self.train_statistics = saved
            try:
                yield
            finally:
                self.train_weights = None

    def make_optimizer(self, params: list[Tensor], flat: FlatParams) -> torch.optim.Optimizer:
        """The --optimizer over `params`: the model's flat vectors, or vectors of their layout that a method
        trains (a curve's bend); with --no-decay-norm-bias, also the masks of what weight decay applies to."""
        self.decay_masks = None if self.cfg.decay_norm_bias else flat.decay_masks()
        return build_optimizer(self.cfg, params)

    def step(self, flat: FlatParams, closure: Closure, lr: float) -> dict[str, Any]:
        raise NotImplementedError

    def base_update(self, params: list[Tensor], grads: list[Tensor], lr: float,
                    checks: dict[str, Tensor] | None = None) -> dict[str, Any]:
        """Refuse a non-finite step, clip (if asked), then step the optimizer over `params` at `lr`.

        `params` are the optimizer's vectors with `grads` their gradients (param.grad is grad for
        flat vectors). Under torchrun the gradients are first averaged over the ranks (each holds its
        shard's mean): every rank then takes the same step, so weights stay bitwise identical; SAM's
        ascent, taken before, stays per rank (m = the per-rank batch, as the SAM paper's setup). The
        gradient norm and `checks` (the loss, SAM's ascent norm) are tested with one host sync;
        NonFiniteError is raised before anything moves, so the weights and the optimizer state stay
        those of the last good step. With a scaler (fp16) the gradient is unscaled in place first, and
        an overflow skips the step and halves the scale instead (GradScaler's policy).
        """
        dist.all_reduce_mean_(grads)  # torchrun: the global batch's gradient, one all-reduce per flat vector
        for p, g in zip(params, grads):
            if p.grad is not g:
                p.grad = g
        if self.scaler is not None:  # fp16: grads hold scale x gradient; an inf on any rank is inf on all now
            self.scaler.unscale_(self.optimizer)  # in place, and notes on the device whether any is inf/nan
        sqnorm = ops.total_sqnorm(grads)  # (1,) fp32 (fp64 for fp64 grads): one read of N
        try:
            finite_or_raise({**(checks or {}), "gradient norm": sqnorm})  # the one host sync of the step
        except NonFiniteError:
            if self.scaler is None or bool(torch.isfinite(sqnorm).all()):
                raise  # a non-finite loss with a finite gradient is no overflow
            return self._skip_overflow()
        self.overflows_in_a_row = 0
        metrics: dict[str, Any] = {}
        if self.cfg.clip_grad is not None:
            metrics["grad_norm"] = ops.clip_grad_norm_flat_(grads, self.cfg.clip_grad, sqnorm)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.decay_masks is not None and self.cfg.weight_decay:  # --no-decay-norm-bias
            decay_(type(self.optimizer), params, grads, self.decay_masks, lr, self.cfg.weight_decay)
        self.optimizer.step()  # fp16 too: the gradient is known finite, so scaler.step would only sync again
        if self.scaler is not None:
            self.scaler.update()  # reads unscale_'s inf flag on the device; grows the scale after 2000 clean steps
        return metrics

    def _skip_overflow(self) -> dict[str, Any]:
        """fp16: the scaled gradient overflowed. Nothing moves (no optimizer step), the scale halves
        (update() reads the inf that unscale_ found); only a run of overflows no scale explains is a
        non-finite error."""
        self.scaler.update()
        self.overflows_in_a_row += 1
        if self.overflows_in_a_row >= MAX_OVERFLOWS_IN_A_ROW:
            self.overflows_in_a_row = 0
            raise NonFiniteError(f"non-finite gradient in {MAX_OVERFLOWS_IN_A_ROW} fp16 steps in a row "
                                 f"(loss scale now {self.scaler.get_scale():.3g}): not an overflow")
        return {"overflow": True}

    def weights(self, flat: FlatParams) -> list[Tensor]:
        """The weights this method delivers as its model, one (N,) vector per flat group: the current
        ones, or an average (SWA). Its finish() scores them (SWA: after re-estimating BatchNorm, as
        swa_acc, and says "delivers": "swa" so that the summary's test_acc is that model's); the per-epoch
        test scores in metrics.jsonl are of the current weights, the iterate (iterate_acc in the summary)."""
        return flat.params

    def lr(self, step: int, scheduled: float) -> float:
        """The LR for 0-based `step`; methods that own their cycle (SWA, FGE, snapshots) override."""
        return scheduled

    def after_step(self, flat: FlatParams, steps_done: int) -> None:
        """Called after every optimizer step (collect snapshots, update averages)."""

    def end_epoch(self, flat: FlatParams, epoch: int) -> None:
        """Called after each epoch's last step."""

    def epoch_scores(self, flat: FlatParams) -> dict[str, float]:
        """Extra scores for an evaluated epoch's record, beside the iterate's test scores (EMA: its average's)."""
        return {}

    def finish(self, flat: FlatParams) -> dict[str, Any]:
        """After the last epoch: extra results for the summary (averaged model, ensemble). A method that
        delivers another model than its last iterate returns its scores as <name>_acc and <name>_loss
        and "delivers": <name>."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        state = {"optimizer": self.optimizer.state_dict()}
        if self.scaler is not None:
            state["overflows_in_a_row"] = self.overflows_in_a_row
        if self.train_weights is not None:  # schedule-free, saved while the model held x: y to train on from
            state.update(train_weights=self.train_weights, train_statistics=self.train_statistics)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.overflows_in_a_row = int(state.get("overflows_in_a_row", 0))
        if state.get("train_weights") is not None:  # back to y, in train mode, bit for bit
            with torch.no_grad():
                for p, y in zip(self.flat.params, state["train_weights"]):
                    p.copy_(y)
                buffers = dict(self.flat.model.named_buffers())
                for name, b in state["train_statistics"].items():
                    buffers[name].copy_(b)
            for group in self.optimizer.param_groups:
                group["train_mode"] = True
