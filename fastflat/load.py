"""Reading saved runs back, for every command that scores one: checkpoint -> config -> data -> model.

    run = load_run("runs/sam-...")                      # a run directory, a checkpoint or RUN/members/<tag>.pt
    run.model, run.data, run.config, run.state           # weights loaded, on run.device
    shared = load_shared([a, b, c])                      # several points of one architecture and dataset

Each problem (no such file, a damaged checkpoint, weights of another architecture, runs of different
models or datasets) is one UserError naming the path, raised before any data is read where it can be.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fastflat import data as datasets
from fastflat.config import config_from_dict
from fastflat.data.models import build_model
from fastflat.errors import UserError
from fastflat.loss.evaluation import resolve_device
from fastflat.runs.rundir import load_point, load_weights


@dataclass
class LoadedRun:
    path: Path
    state: dict[str, Any]  # the checkpoint's entries; "model" is the point's state_dict
    config: Any  # TrainConfig of the run
    data: datasets.Dataset  # as the run saw it: its label noise and seed (validation and subset not split off)
    model: torch.nn.Module  # a plain, unflattened model with the point's weights, on `device`
    device: torch.device


@dataclass
class SharedRuns:
    paths: list[Path]
    states: list[dict[str, Any]]
    config: Any  # the first run's config: its label noise and seed define the data
    data: datasets.Dataset
    model: torch.nn.Module  # the architecture, holding the first point's weights
    device: torch.device


def check_same_model_and_data(paths: list[Path], configs: list[Any]) -> None:
    """Runs to be compared, averaged or ensembled must share one architecture and dataset."""
    first = configs[0]
    for path, cfg in zip(paths, configs):
        if (cfg.model, cfg.dataset) != (first.model, first.dataset):
            raise UserError(f"{path} is a {cfg.model} / {cfg.dataset} run, {paths[0]} a {first.model} / "
                            f"{first.dataset} one: the runs must share one model and dataset")


def data_and_model(cfg: Any, device: torch.device, data_dir: str | None) -> tuple[datasets.Dataset, torch.nn.Module]:
    data = datasets.load_dataset(cfg.dataset, data_dir or cfg.data_dir, device, cfg.label_noise, cfg.seed,
                                 image_size=cfg.image_size, bad_images=cfg.bad_images)
    return data, build_model(cfg.model, data.in_channels, data.num_classes, data.image_size).to(device)


def load_shared(paths: list[str | Path], device: str = "auto", data_dir: str | None = None) -> SharedRuns:
    """Several points (runs, checkpoints, member files) of one model and dataset: every checkpoint read
    and checked first, then the data and one model (the first point's weights loaded) built once."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise UserError("no runs given")
    states = [load_point(p) for p in paths]
    configs = [config_from_dict(s["config"]) for s in states]
    check_same_model_and_data(paths, configs)
    dev = resolve_device(device)
    data, model = data_and_model(configs[0], dev, data_dir)
    load_weights(model, states[0]["model"], f"weights {paths[0]}", configs[0].model)
    return SharedRuns(paths, states, configs[0], data, model, dev)


def load_run(path: str | Path, device: str = "auto", data_dir: str | None = None) -> LoadedRun:
    """One saved point with its run's data and a model holding its weights."""
    shared = load_shared([path], device, data_dir)
    return LoadedRun(shared.paths[0], shared.states[0], shared.config, shared.data, shared.model, shared.device)
