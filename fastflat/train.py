"""The shared training loop: batches -> closure -> method.step -> schedule -> eval / log / checkpoint.

    summary = fastflat.train.train(load_config(overrides={"method": "sam"}))

Every method plugs in through fastflat.methods.Method; this file knows nothing of any method's math.
Progress reaches a caller through `Hooks` (the CLI draws it with Rich); results land in a RunDir.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastflat import data as datasets
from fastflat.config import TrainConfig, config_from_dict, to_dict
from fastflat.errors import UserError
from fastflat.flat import FlatParams, flatten
from fastflat.methods import Method, build_method
from fastflat.models import build_model
from fastflat.rundir import RunDir, load_checkpoint, provenance
from fastflat.schedules import make_schedule


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"device {name!r} is not a torch device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} asked for, but torch sees no CUDA device; use --device cpu")
    return device


@contextlib.contextmanager
def frozen_bn_stats(model: nn.Module) -> Iterator[None]:
    """BatchNorm normalises with batch statistics but leaves running stats and counters untouched."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    for m in norms:
        m.track_running_stats = False  # forward then passes no running buffers to F.batch_norm
    try:
        yield
    finally:
        for m in norms:
            m.track_running_stats = True


class BatchClosure:
    """The method's view of one batch (see methods.Closure). Also tallies training loss/accuracy
    from the first pass over each part of the batch, which every method takes at unperturbed weights."""

    def __init__(self, model: nn.Module, flat: FlatParams, x: Tensor, y: Tensor, amp: str):
        self.model, self.flat, self.x, self.y = model, flat, x, y
        self.batch_size = x.shape[0]
        self.amp_dtype = torch.bfloat16 if amp == "bf16" else None
        self.loss_sum = torch.zeros((), device=x.device)  # summed over examples, fp32
        self.correct = torch.zeros((), device=x.device, dtype=torch.long)
        self._tallied: set[tuple[int, int]] = set()

    def __call__(self, backward: bool = True, part: slice | None = None, update_bn: bool = True) -> Tensor:
        span = (0, self.batch_size) if part is None else (part.start, part.stop)
        x, y = self.x[span[0] : span[1]], self.y[span[0] : span[1]]
        bn = contextlib.nullcontext() if update_bn else frozen_bn_stats(self.model)
        amp = torch.autocast(x.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)
        with torch.set_grad_enabled(backward), bn, amp:
            logits = self.model(x)  # (B, classes)
            loss = F.cross_entropy(logits.float(), y)
        if backward:
            self.flat.zero_grad_()
            loss.backward()
        loss = loss.detach()
        if span not in self._tallied:
            self._tallied.add(span)
            self.loss_sum += loss * (span[1] - span[0])
            self.correct += (logits.detach().argmax(1) == y).sum()
        return loss


@torch.no_grad()
def evaluate(model: nn.Module, split: datasets.Split, dataset: datasets.Dataset, batch_size: int,
             amp: str = "none") -> dict[str, float]:
    """Mean cross-entropy and accuracy (%) of `model` on a whole split, in eval mode."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=split.labels.device)
    correct = torch.zeros((), device=split.labels.device, dtype=torch.long)
    amp_dtype = torch.bfloat16 if amp == "bf16" else None
    for x, y in datasets.iterate_batches(split, batch_size, dataset=dataset, train=False):
        with torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(x).float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
    model.train(was_training)
    n = len(split)
    return {"loss": loss_sum.item() / n, "acc": 100.0 * correct.item() / n}


class Hooks:
    """Progress callbacks; the defaults do nothing. The CLI subclasses this with a Rich display."""

    def on_start(self, info: dict[str, Any]) -> None: ...
    def on_step(self, step: int, metrics: dict[str, float]) -> None: ...
    def on_epoch(self, record: dict[str, Any]) -> None: ...
    def on_end(self, summary: dict[str, Any]) -> None: ...


@dataclass
class Position:
    """Where the loop is; the whole of the loop's own state that a checkpoint needs."""

    epoch: int = 0  # current epoch (0-based)
    batch: int = 0  # next batch index inside the epoch
    step: int = 0  # optimizer steps taken in total


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """Batch order and augmentation of an epoch depend on (seed, epoch) only: resumable mid-epoch."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def default_run_name(cfg: TrainConfig) -> str:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{cfg.method}-{cfg.dataset}-{cfg.model}-s{cfg.seed}-{stamp}"


class Trainer:
    """Builds data, model, flat buffer and method for a config, then runs epochs from a Position."""

    def __init__(self, cfg: TrainConfig, run: RunDir, hooks: Hooks | None = None):
        self.cfg, self.run, self.hooks = cfg, run, hooks or Hooks()
        self.device = resolve_device(cfg.device)
        torch.manual_seed(cfg.seed)
        self.data = datasets.load_dataset(cfg.dataset, cfg.data_dir, self.device, cfg.label_noise, cfg.seed)
        self.data, self.validation = datasets.hold_out_validation(self.data, cfg.val_split, cfg.seed)
        self.evolution: datasets.Split | None = None
        if cfg.method == "spartan":  # fitness data that SGD never sees, fixed by the seed
            kept, self.evolution = datasets.split_holdout(self.data.train, cfg.spartan.evolution_split, cfg.seed)
            self.data = replace(self.data, train=kept)
        self.model = build_model(cfg.model, self.data.in_channels, self.data.num_classes,
                                 self.data.image_size).to(self.device)
        if cfg.init:
            self.model.load_state_dict(load_checkpoint(cfg.init)["model"])
        self.flat = flatten(self.model)  # after .to(): moving re-creates parameters
        self.steps_per_epoch = datasets.num_batches(len(self.data.train), cfg.batch_size, drop_last=True)
        if self.steps_per_epoch == 0:
            raise UserError(f"batch_size {cfg.batch_size} is larger than the {len(self.data.train)} training examples")
        total = self.total_steps = cfg.epochs * self.steps_per_epoch
        self.method: Method = build_method(cfg)
        self.method.init(self.flat, self)
        self.schedule = make_schedule(cfg.schedule, cfg.lr, total, round(cfg.warmup_epochs * self.steps_per_epoch))
        self.position = Position()
        self.started = time.time()

    # -- services for methods (methods.RunServices) ---------------------------------------------------
    def update_bn(self) -> None:
        batches = datasets.iterate_batches(self.data.train, max(self.cfg.batch_size, 256), dataset=self.data, train=False)
        torch.optim.swa_utils.update_bn(batches, self.model, self.device)

    def evaluate(self) -> dict[str, float]:
        return evaluate(self.model, self.data.test, self.data, max(self.cfg.batch_size, 512), self.cfg.amp)

    def save_member(self, tag: str) -> str:
        path = self.run.save_member(tag, self.model.state_dict())
        return str(path)

    def evaluate_ensemble(self, paths: list[str]) -> dict[str, Any]:
        from fastflat.ensemble import evaluate_members

        plain = build_model(self.cfg.model, self.data.in_channels, self.data.num_classes,
                            self.data.image_size).to(self.device)
        return evaluate_members(plain, paths, self.data.test, self.data)

    def evolution_batches(self) -> list[tuple[Tensor, Tensor]]:
        split = self.evolution if self.evolution is not None else self.data.train
        n = self.cfg.spartan.fitness_examples or len(split)
        head = datasets.Split(split.images[:n], split.labels[:n])
        return list(datasets.iterate_batches(head, 256, dataset=self.data, train=False))

    def log_event(self, record: dict[str, Any]) -> None:
        self.run.append_metrics({"step": self.position.step, **record}, name="evolution.jsonl")

    # -- checkpoints ---------------------------------------------------------------------------------
    def checkpoint(self) -> None:
        self.run.save_checkpoint({
            "config": to_dict(self.cfg),
            "model": self.model.state_dict(),
            "method": self.method.state_dict(),
            "position": vars(self.position).copy(),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None,
        })

    def restore(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])  # copies into the flat views: they stay intact
        self.method.load_state_dict(state["method"])
        self.position = Position(**state["position"])
        torch.set_rng_state(state["rng_cpu"])
        if state.get("rng_cuda") is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        self.flat.check_views()

    # -- the loop ------------------------------------------------------------------------------------
    def run_epochs(self) -> dict[str, Any]:
        cfg, pos = self.cfg, self.position
        self.hooks.on_start({"run_dir": str(self.run.path), "steps_per_epoch": self.steps_per_epoch,
                             "total_steps": cfg.epochs * self.steps_per_epoch, "step": pos.step,
                             "device": str(self.device), "params": self.flat.numel,
                             "train_size": len(self.data.train), "noisy_labels": self.data.noisy_labels})
        self.model.train()
        try:
            while pos.epoch < cfg.epochs:
                self._run_epoch()
        except KeyboardInterrupt:
            self.checkpoint()  # keep every finished step; --resume continues from here
            raise
        return self._finish()

    def _run_epoch(self) -> None:
        cfg, pos = self.cfg, self.position
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        seen, epoch_start = 0, time.time()
        batches = datasets.iterate_batches(self.data.train, cfg.batch_size, dataset=self.data, train=True,
                                           generator=epoch_generator(cfg.seed, pos.epoch), drop_last=True)
        for index, (x, y) in enumerate(batches):
            if index < pos.batch:
                continue  # resumed mid-epoch: replay the order, skip the work
            lr = self.method.lr(pos.step, self.schedule(pos.step))
            closure = BatchClosure(self.model, self.flat, x, y, cfg.amp)
            metrics = self.method.step(self.flat, closure, lr)
            loss_sum += closure.loss_sum
            correct += closure.correct
            seen += closure.batch_size
            pos.step, pos.batch = pos.step + 1, index + 1
            self.method.after_step(self.flat, pos.step)
            self.hooks.on_step(pos.step, {"lr": lr, "seen": seen, "epoch": pos.epoch,
                                          "loss_sum": loss_sum, "correct": correct, **metrics})
            if cfg.checkpoint_every and pos.step % cfg.checkpoint_every == 0:
                self.checkpoint()
        self.method.end_epoch(self.flat, pos.epoch)
        elapsed = time.time() - epoch_start
        test = self.evaluate()
        val: dict[str, float] = {}
        if self.validation is not None:  # for choosing epochs, members, k without the test set
            scored = evaluate(self.model, self.validation, self.data, max(cfg.batch_size, 512), cfg.amp)
            val = {"val_loss": scored["loss"], "val_acc": scored["acc"]}
        last = max(pos.step - 1, 0)
        record = {"epoch": pos.epoch + 1, "step": pos.step, "lr": self.method.lr(last, self.schedule(last)),
                  "train_loss": loss_sum.item() / max(seen, 1), "train_acc": 100.0 * correct.item() / max(seen, 1),
                  "test_loss": test["loss"], "test_acc": test["acc"], "epoch_seconds": elapsed,
                  **val,
                  "samples_per_s": seen / max(elapsed, 1e-9)}
        pos.epoch, pos.batch = pos.epoch + 1, 0
        self.run.append_metrics(record)
        self.checkpoint()
        self.hooks.on_epoch(record)

    def _finish(self) -> dict[str, Any]:
        extra = self.method.finish(self.flat)
        history = self.run.read_metrics()
        final = history[-1] if history else {}
        summary = {
            "run_dir": str(self.run.path), "method": self.cfg.method, "model": self.cfg.model,
            "dataset": self.cfg.dataset, "epochs": self.cfg.epochs, "steps": self.position.step,
            "test_acc": final.get("test_acc"), "test_loss": final.get("test_loss"),
            "train_loss": final.get("train_loss"), "train_seconds": sum(r["epoch_seconds"] for r in history),
            "params": self.flat.numel, "train_size": len(self.data.train),
            "evolution_split_size": len(self.evolution) if self.evolution is not None else 0,
            "val_split_size": len(self.validation) if self.validation is not None else 0,
            "val_acc": final.get("val_acc"),
            "noisy_labels": self.data.noisy_labels, "data_source": self.data.source,
            **extra, "config": to_dict(self.cfg), "provenance": provenance(self.device),
        }
        self.run.write_summary(summary)
        try:
            from fastflat.plots import plot_training_curves

            plot_training_curves(history, self.run.path / "curves.png", title=self.run.path.name)
        except ImportError:
            pass  # matplotlib missing: the numbers are in metrics.jsonl
        self.hooks.on_end(summary)
        return summary


def train(cfg: TrainConfig, hooks: Hooks | None = None) -> dict[str, Any]:
    """Start a new run in cfg.out / (cfg.name or a generated name) and train it to the end."""
    run = RunDir.create(cfg.out, cfg.name or default_run_name(cfg))
    if cfg.name is None:
        cfg = replace(cfg, name=run.path.name)
    run.write_config(to_dict(cfg))
    trainer = Trainer(cfg, run, hooks)
    return trainer.run_epochs()


def resume(run_dir: str | Path, hooks: Hooks | None = None) -> dict[str, Any]:
    """Continue a run from its last checkpoint, with the config it was started with."""
    run = RunDir.open(run_dir)
    state = load_checkpoint(run.checkpoint_path)
    cfg = config_from_dict(state["config"])
    trainer = Trainer(cfg, run, hooks)
    trainer.restore(state)
    run.truncate_metrics(trainer.position.step)
    return trainer.run_epochs()
