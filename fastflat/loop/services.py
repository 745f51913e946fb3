"""What the trainer offers a method beyond its batch (methods.RunServices): BatchNorm re-estimation,
test scores, member files, ensembles, held-out splits, other runs' weights and event lines. One object,
built with the run's parts (loop.assembly) and passed to the method's init; the trainer shares it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fastflat import data as datasets
from fastflat.flat import FlatParams
from fastflat.loss.batchnorm import update_bn
from fastflat.loss.evaluation import evaluate
from fastflat.data.models import build_model
from fastflat.runs.rundir import load_point, load_weights


class Services:
    """The run's parts, and the work a method may ask of them (fastflat.methods.RunServices)."""

    def __init__(self, cfg: Any, run: Any, data: datasets.Dataset, model: torch.nn.Module, flat: FlatParams,
                 device: torch.device, validation: datasets.Split | None, holdouts: dict[str, datasets.Split], *,
                 user_model: torch.nn.Module | None, steps_per_epoch: int, total_steps: int, resuming: bool,
                 scaler: torch.amp.GradScaler | None, hooks: Any):
        self.cfg, self.run, self.data, self.model, self.flat, self.device = cfg, run, data, model, flat, device
        self.validation, self.holdouts, self.user_model = validation, holdouts, user_model
        self.steps_per_epoch, self.total_steps = steps_per_epoch, total_steps
        self.resuming = resuming  # methods need not reload what the checkpoint holds (a curve's end points)
        self.scaler, self.hooks = scaler, hooks
        self.step = 0  # the optimizer steps taken so far; the trainer keeps it current (event lines carry it)

    def update_bn(self) -> None:
        batches = datasets.iterate_batches(self.data.train, max(self.cfg.batch_size, 256), dataset=self.data, train=False)
        update_bn(batches, self.model, self.device, exact=True)  # exact over the examples: a short last batch weighs by its size

    def evaluate(self) -> dict[str, float]:
        return evaluate(self.model, self.data.test, self.data, max(self.cfg.batch_size, 512), self.cfg.amp)

    def save_member(self, tag: str) -> str:
        return str(self.run.save_member(tag, self.model.state_dict()))

    def _plain_model(self) -> torch.nn.Module:
        """A fresh, unflattened model of the run's architecture, to load members into."""
        if self.user_model is not None:
            import copy

            return copy.deepcopy(self.model)  # the copy's parameters own their storage
        return build_model(self.cfg.model, self.data.in_channels, self.data.num_classes,
                           self.data.image_size).to(self.device)

    def evaluate_ensemble(self, paths: list[str]) -> dict[str, Any]:
        from fastflat.analysis.ensemble import evaluate_members

        return evaluate_members(self._plain_model(), paths, self.data.test, self.data)

    def validation_best_k(self, paths: list[str]) -> int:
        from fastflat.analysis.ensemble import validation_choice

        return validation_choice(self._plain_model(), [Path(p) for p in paths], self.validation, self.data)["best_k"]

    def holdout_batches(self, purpose: str, limit: int = 0) -> list[tuple[Tensor, Tensor]]:
        """The split held out for `purpose` (its first `limit` examples; 0 = all), as fixed batches."""
        split = self.holdouts.get(purpose, self.data.train)
        n = limit or len(split)
        head = datasets.Split(split.images[:n], split.labels[:n])
        return list(datasets.iterate_batches(head, 256, dataset=self.data, train=False))

    def point_weights(self, path: str) -> tuple[dict[str, Any], list[Tensor]]:
        """Another run's (or member file's) config, and its weights in this model's flat layout."""
        state = load_point(path)
        load_weights(self.model, state["model"], f"weights {path}", self.cfg.model)
        return state["config"], self.flat.clone_params()

    def log_event(self, record: dict[str, Any]) -> None:
        """A mutation round: a line of evolution.jsonl, and one on the console as it happens."""
        self.run.append_metrics({"step": self.step, **record}, name="evolution.jsonl")
        if "round" in record:
            verdict = "child replaced the parent" if record.get("replaced") else "parent kept"
            self.hooks.on_event(f"mutation round {record['round']} ({record.get('mutation')}): held-out loss "
                                f"{record['parent_loss']:.4f} -> {record['heldout_loss']:.4f}, children best "
                                f"{record['children_best_loss']:.4f} / mean {record['children_mean_loss']:.4f}; {verdict}")
