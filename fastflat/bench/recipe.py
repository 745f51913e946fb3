"""`fastflat bench recipe`: time to accuracy of the old main-job recipe, today's defaults, and a plain PyTorch
loop training the default recipe, all in one run (so their seconds compare), on the CPU: the goals are set for 2 cores.

    rows = run_recipe(RecipeSettings(seeds=[0, 1, 2]))      # one row per (contender, seed, epoch end)

Each contender is a whole training run, timed as the trainer times it (the wall time of its steps;
evaluation, checkpoints and data loading excluded), scored on the test set at every epoch end: those
points make its time-to-accuracy curve. With the cosine schedule an intermediate point is not what a run
of that shorter budget would reach (its LR has not annealed yet); the last point is the run's result.
`plain-sgd` is the overhead check: torch.optim.SGD and a LambdaLR over the same model, batches, schedule and
label smoothing as `sgd`, with no flat buffer, method or checkpoint; its final accuracy differs from
`sgd`'s only by float rounding (the flat buffer sums in another order).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from fastflat import data as datasets
from fastflat.config import load_config
from fastflat.errors import UserError

OLD_MAIN_JOB = {  # the main job before the time-to-accuracy recipe: what the new defaults are measured against
    "method": "sam", "model": "cnn", "batch_size": 128, "lr": 0.05, "epochs": 2, "label_smoothing": 0.0,
    "memory_format": "contiguous", "nesterov": False, "weight_decay": 5e-4, "warmup_epochs": 0.0,
}
CONTENDERS: dict[str, dict[str, Any]] = {
    "old-sam": OLD_MAIN_JOB,  # `fastflat train --method sam` before: cnn, batch 128, lr 0.05, 2 epochs
    "sam": {"method": "sam"},  # `fastflat train --method sam`, today's defaults
    "sgd": {"method": "sgd"},  # `fastflat train --method sgd`
    "plain-sgd": {"method": "sgd"},  # the same recipe as sgd, in a plain PyTorch loop
}
BASELINE = "old-sam"
TARGET_ACC = 91.0  # issue 23's goal for the main job and SGD on Fashion-MNIST
EpochDone = Callable[[int, float, float], None]  # (epoch, training seconds so far, test accuracy)
RECIPE_FIELDS = ("contender", "seed", "epoch", "seconds", "test_acc", "final", "command")


@dataclass
class RecipeSettings:
    seeds: list[int] = field(default_factory=lambda: [0])
    contenders: list[str] = field(default_factory=lambda: list(CONTENDERS))
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # overrides for every contender (tests: a tiny budget)
    out: str = "runs"  # run directories of the fastflat contenders go under OUT/bench-recipe


def command(name: str) -> str:
    """The `fastflat train` command line a contender stands for: the options where it differs from today's defaults."""
    if name == "plain-sgd":
        return "(plain PyTorch loop, the sgd recipe)"
    defaults = load_config()
    options = []
    for key, value in CONTENDERS[name].items():
        if key == "method" or getattr(defaults, key) == value:
            continue
        option = "--" + key.replace("_", "-")
        options.append((option if value else f"--no-{option[2:]}") if isinstance(value, bool) else f"{option} {value}")
    return " ".join([f"fastflat train --method {CONTENDERS[name]['method']}", *options])


def run_recipe(settings: RecipeSettings, on_run: Callable[[str], None] = lambda text: None) -> list[dict[str, Any]]:
    unknown = [c for c in settings.contenders if c not in CONTENDERS]
    if unknown:
        raise UserError(f"--contenders: unknown {', '.join(map(repr, unknown))}; choose from {', '.join(CONTENDERS)}")
    rows: list[dict[str, Any]] = []
    for seed in settings.seeds:
        for name in settings.contenders:
            on_run(f"training {name}, seed {seed}")
            overrides = {**CONTENDERS[name], "dataset": settings.dataset, "data_dir": settings.data_dir, "device": "cpu",
                         "seed": seed, **settings.extra}
            def epoch_done(epoch: int, seconds: float, acc: float) -> None:  # a line a minute or so: never silent
                on_run(f"  {name}, seed {seed}: epoch {epoch}, {seconds:.1f} s of training, test accuracy {acc:.2f}%")

            curve = (_plain_curve(overrides, epoch_done) if name == "plain-sgd"
                     else _fastflat_curve(overrides, settings.out, epoch_done))
            for i, (seconds, acc) in enumerate(curve):
                rows.append({"contender": name, "seed": seed, "epoch": i + 1, "seconds": seconds, "test_acc": acc,
                             "final": i == len(curve) - 1, "command": command(name)})
    return rows


def _fastflat_curve(overrides: dict[str, Any], out: str, epoch_done: EpochDone) -> list[tuple[float, float]]:
    """(seconds of training so far, test accuracy) at each epoch end of one fastflat run."""
    from fastflat.loop.api import train
    from fastflat.loop.steps import Hooks
    from fastflat.runs.rundir import RunDir

    class Report(Hooks):
        seconds = 0.0

        def on_epoch(self, record: dict[str, Any]) -> None:
            self.seconds += record["epoch_seconds"]
            epoch_done(record["epoch"], self.seconds, record["test_acc"])

    summary = train(load_config(overrides={**overrides, "out": str(Path(out) / "bench-recipe"), "eval_every": 1}),
                    hooks=Report())
    seconds, curve = 0.0, []
    for record in RunDir.open(summary["run_dir"]).read_metrics():
        seconds += record["epoch_seconds"]
        curve.append((seconds, record["test_acc"]))
    return curve


def _plain_curve(overrides: dict[str, Any], epoch_done: EpochDone) -> list[tuple[float, float]]:
    """The sgd recipe as anyone would write it in PyTorch: model, torch.optim.SGD, LambdaLR, a loop."""
    from fastflat.data.models import build_model
    from fastflat.loop.assembly import channels_last, take_subsets
    from fastflat.loop.steps import epoch_generator
    from fastflat.loss.evaluation import evaluate
    from fastflat.methods.schedules import make_schedule

    cfg = load_config(overrides=overrides)
    data = datasets.load_dataset(cfg.dataset, cfg.data_dir, "cpu", seed=cfg.seed)
    data = take_subsets(data, cfg)  # as the trainer takes them: the same examples for both loops
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, data.in_channels, data.num_classes, data.image_size)
    if channels_last(cfg, model):  # the layout the trainer would pick, made torch's way
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                                weight_decay=cfg.weight_decay)
    per_epoch = datasets.num_batches(len(data.train), cfg.batch_size, drop_last=True)
    total = per_epoch * cfg.epochs
    if cfg.max_steps:
        total = min(total, cfg.max_steps)
    schedule = make_schedule(cfg.schedule, cfg.lr, per_epoch * cfg.epochs, round(cfg.warmup_epochs * per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule(step) / cfg.lr)
    seconds, curve, step = 0.0, [], 0
    for epoch in range(math.ceil(total / per_epoch)):
        batches = datasets.iterate_batches(data.train, cfg.batch_size, dataset=data, train=True,
                                           generator=epoch_generator(cfg.seed, epoch), drop_last=True)
        start = time.perf_counter()
        for x, y in batches:
            loss = F.cross_entropy(model(x), y, label_smoothing=cfg.label_smoothing)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            if step == total:
                break
        seconds += time.perf_counter() - start
        curve.append((seconds, evaluate(model, data.test, data, max(cfg.batch_size, 512))["acc"]))
        epoch_done(epoch + 1, *curve[-1])
    return curve


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per contender: mean final accuracy and training seconds over the seeds, seconds as x the baseline's
    (when it ran), and the first epoch-end time at or above TARGET_ACC: the mean over the seeds that reach it
    (None if none does), with how many do."""
    finals = [r for r in rows if r["final"]]
    names = list(dict.fromkeys(r["contender"] for r in finals))
    base = [r["seconds"] for r in finals if r["contender"] == BASELINE]
    base_seconds = sum(base) / len(base) if base else None
    summary = []
    for name in names:
        mine = [r for r in finals if r["contender"] == name]
        accs, secs = [r["test_acc"] for r in mine], [r["seconds"] for r in mine]
        reached = []
        for seed in {r["seed"] for r in mine}:
            hits = [r["seconds"] for r in rows if r["contender"] == name and r["seed"] == seed
                    and r["test_acc"] >= TARGET_ACC]
            reached.append(min(hits) if hits else None)
        mean_acc = sum(accs) / len(accs)
        std_acc = (sum((a - mean_acc) ** 2 for a in accs) / (len(accs) - 1)) ** 0.5 if len(accs) > 1 else 0.0
        mean_s = sum(secs) / len(secs)
        hit = [t for t in reached if t is not None]
        summary.append({"contender": name, "seeds": len(mine), "test_acc": mean_acc, "test_acc_std": std_acc,
                        "seconds": mean_s, "x_baseline": mean_s / base_seconds if base_seconds else None,
                        f"seconds_to_{TARGET_ACC:g}": sum(hit) / len(hit) if hit else None,
                        f"seeds_reaching_{TARGET_ACC:g}": len(hit), "command": command(name)})
    return summary


def plot_time_to_accuracy(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Test accuracy against training seconds, one line per (contender, seed), the target as a dashed line."""
    from fastflat.analysis.plots import plt, save_figure

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = {}
    for name in dict.fromkeys(r["contender"] for r in rows):
        for seed in dict.fromkeys(r["seed"] for r in rows if r["contender"] == name):
            points = [(r["seconds"], r["test_acc"]) for r in rows if r["contender"] == name and r["seed"] == seed]
            line, = ax.plot(*zip(*points), marker="o", color=colors.get(name),
                            label=name if name not in colors else None)
            colors[name] = line.get_color()
    ax.axhline(TARGET_ACC, color="grey", linestyle="--", linewidth=1, label=f"{TARGET_ACC:g}%")
    low = min(r["test_acc"] for r in rows)
    ax.set_ylim(max(low - 1, 0), min(max(r["test_acc"] for r in rows) + 1, 100))
    ax.set_xlabel("training seconds (evaluation excluded)")
    ax.set_ylabel("test accuracy (%) at each epoch's end")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)
