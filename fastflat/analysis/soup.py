"""Model soups (Wortsman et al. 2022): the weights of several fine-tuned runs averaged into one model.

    report = soup_report(["runs/ft-a", "runs/ft-b", "runs/ft-c"], greedy=True)

Every ingredient is a run's final weights. The uniform soup averages all of them. The greedy soup sorts
the ingredients by validation accuracy and adds each in turn only if the soup's validation accuracy does
not drop (the paper's recipe). Every soup gets its BatchNorm statistics recomputed over the training
examples (exact over the examples, fastflat.update_bn). The same runs' ensemble (averaged
probabilities) is scored beside them: a soup costs one model at inference, the ensemble all of them.

Soups need a shared start: averaging runs from different initialisations lands between basins. A
warning says so when the runs were not all fine-tuned from one --init checkpoint. Validation is the
runs' own --val-split (rebuilt from their seed, so no ingredient trained on it); `val_split` holds out
a share of the training set instead, with a warning when the runs may have trained on it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fastflat import data as datasets
from fastflat.analysis.ensemble import metrics_from_probs, predict_probs
from fastflat.config import config_from_dict
from fastflat.errors import UserError
from fastflat.load import load_shared
from fastflat.loss.batchnorm import update_bn

Progress = Callable[[int, int], None]


def soup_report(runs: list[str | Path], greedy: bool = True, val_split: float | None = None, device: str = "auto",
                data_dir: str | None = None, progress: Progress | None = None) -> dict[str, Any]:
    if len(runs) < 2:
        raise UserError("a soup needs at least two runs to average")
    shared = load_shared(runs, device, data_dir)
    configs = [config_from_dict(s["config"]) for s in shared.states]
    first, warnings = configs[0], []
    if any(c.init is None for c in configs) or len({c.init for c in configs}) > 1:
        warnings.append("the runs were not all fine-tuned from one --init checkpoint: soups need a shared start "
                        "(averaging independently trained runs lands between their basins)")
    splits = {(c.val_split, c.seed, c.subset, c.label_noise) for c in configs}
    if val_split is None:
        if first.val_split == 0:
            raise UserError("the runs hold out no validation split (train --val-split): give --val-split F to hold out "
                            "a share of the training set (the runs may have trained on it)")
        if len(splits) > 1:
            raise UserError("the runs held out different validation examples (their --val-split, --seed or --subset "
                            "differ): give --val-split F to use one split for all")
    elif first.val_split != val_split or len(splits) > 1:
        warnings.append(f"--val-split {val_split} holds out training examples the runs may have trained on: the greedy "
                        "choice may favour what they memorised")
    fraction = first.val_split if val_split is None else val_split
    kept, validation = datasets.hold_out_validation(shared.data, fraction, first.seed)
    train = datasets.random_subset(kept.train, first.subset, first.seed)  # the examples the runs trained on
    model, data = shared.model, shared.data
    states = [{k: v.to(shared.device) for k, v in s["model"].items()} for s in shared.states]
    steps, total = [0], len(states) * 2 + 2 + (len(states) - 1 if greedy else 0)

    def scored(state: dict[str, torch.Tensor], recompute_bn: bool) -> dict[str, Any]:
        model.load_state_dict(state)
        if recompute_bn:
            batches = datasets.iterate_batches(train, 512, dataset=data, train=False)
            update_bn(((x,) for x, _ in batches), model, exact=True)
        result = {"val": metrics_from_probs(predict_probs(model, validation, data), validation.labels),
                  "test_probs": predict_probs(model, data.test, data)}
        result["test"] = metrics_from_probs(result["test_probs"], data.test.labels)
        steps[0] += 2
        if progress is not None:
            progress(min(steps[0], total), total)
        return result

    ingredients = [scored(s, recompute_bn=False) for s in states]  # each run as it was trained
    uniform = scored(_average(states), recompute_bn=True)
    report: dict[str, Any] = {
        "runs": [str(r) for r in runs], "model": first.model, "dataset": first.dataset, "warnings": warnings,
        "validation": {"fraction": fraction, "size": len(validation)},
        "ingredients": [{"run": str(r), "val_acc": i["val"]["acc"], "test": i["test"]} for r, i in zip(runs, ingredients)],
        "uniform": {"members": [str(r) for r in runs], "val_acc": uniform["val"]["acc"], "test": uniform["test"]},
        "ensemble": {"test": metrics_from_probs(torch.stack([i["test_probs"] for i in ingredients]).mean(0),
                                                data.test.labels)},
    }
    if greedy:
        order = sorted(range(len(states)), key=lambda i: -ingredients[i]["val"]["acc"])
        chosen, best = [order[0]], ingredients[order[0]]
        for i in order[1:]:  # the paper's greedy soup: keep an ingredient only if validation does not drop
            trial = scored(_average([states[j] for j in chosen + [i]]), recompute_bn=True)
            if trial["val"]["acc"] >= best["val"]["acc"]:
                chosen, best = chosen + [i], trial
        report["greedy"] = {"members": [str(runs[i]) for i in chosen], "val_acc": best["val"]["acc"], "test": best["test"]}
    model.load_state_dict(states[0])
    return report


def _average(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The mean of each floating-point tensor (weights; BatchNorm statistics are recomputed after);
    integer buffers (num_batches_tracked) from the first state."""
    return {k: (torch.stack([s[k].double() for s in states]).mean(0).to(v.dtype) if v.is_floating_point() else v.clone())
            for k, v in states[0].items()}
