"""Ensembles of saved models: accuracy, NLL, ECE of the ensemble and of each member, disagreement.

    report = evaluate_members(model, ["runs/x/members/fge-01.pt", ...], data.test, data)

Members are state_dict files loaded one at a time into one model, so memory holds one model plus the
running sum of probabilities (N, C) and each member's predicted class (M, N), whatever M is.
The ensemble averages the members' softmax outputs, as the snapshot-ensemble and FGE papers do.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fastflat import data as datasets
from fastflat.errors import UserError

ECE_BINS = 15  # equal-width confidence bins, as in Guo et al. 2017


@torch.no_grad()
def predict_probs(model: nn.Module, split: datasets.Split, dataset: datasets.Dataset,
                  batch_size: int = 1024) -> Tensor:
    """Softmax outputs (N, C) fp32 of `model` in eval mode over a whole split, in order."""
    was_training = model.training
    model.eval()
    probs = torch.cat([model(x).float().softmax(1)
                       for x, _ in datasets.iterate_batches(split, batch_size, dataset=dataset, train=False)])
    model.train(was_training)
    return probs


def metrics_from_probs(probs: Tensor, labels: Tensor, bins: int = ECE_BINS) -> dict[str, float]:
    """Accuracy (%), NLL (mean -log p[label]) and ECE (%) of predicted probabilities (N, C)."""
    confidence, predicted = probs.max(1)
    correct = (predicted == labels).float()
    nll = -probs.gather(1, labels[:, None]).clamp_min(1e-12).log().mean()
    edges = torch.linspace(0, 1, bins + 1, device=probs.device)
    which = torch.bucketize(confidence, edges[1:-1], right=False)  # (N,) bin index 0..bins-1
    gap = torch.zeros(bins, device=probs.device).index_add_(0, which, confidence - correct)
    ece = gap.abs().sum() / len(labels)  # sum over bins of |sum(conf - correct)| / N
    return {"acc": 100.0 * correct.mean().item(), "nll": nll.item(), "ece": 100.0 * ece.item()}


def mean_pairwise_disagreement(predictions: Tensor) -> float:
    """Mean over member pairs of the % of examples where their predicted classes differ; (M, N) int."""
    m = predictions.shape[0]
    if m < 2:
        return 0.0
    differ = [(predictions[i] != predictions[j]).float().mean() for i in range(m) for j in range(i + 1, m)]
    return 100.0 * torch.stack(differ).mean().item()


def load_member(model: nn.Module, path: str | Path, device: torch.device) -> None:
    try:
        state = torch.load(path, map_location=device, weights_only=True)  # never unpickle code
    except FileNotFoundError:
        raise UserError(f"ensemble member {path} is missing") from None
    except Exception as e:  # truncated or foreign file
        raise UserError(f"ensemble member {path} is unreadable ({type(e).__name__})") from None
    if "format" in state:  # a run's checkpoint.pt: the weights are under "model"
        state = state["model"]
    model.load_state_dict(state)


def evaluate_members(model: nn.Module, paths: list[str | Path], split: datasets.Split,
                     dataset: datasets.Dataset, batch_size: int = 1024) -> dict[str, Any]:
    """Each member's metrics, the ensemble's, accuracy as members are added, and disagreement."""
    if not paths:
        raise UserError("no ensemble members to evaluate")
    device = split.labels.device
    labels = split.labels
    prob_sum: Tensor | None = None
    predictions, members, curve = [], [], []
    for k, path in enumerate(paths, start=1):
        load_member(model, path, device)
        probs = predict_probs(model, split, dataset, batch_size)
        prob_sum = probs if prob_sum is None else prob_sum + probs
        predictions.append(probs.argmax(1))
        members.append({"member": str(path), **metrics_from_probs(probs, labels)})
        curve.append(metrics_from_probs(prob_sum / k, labels)["acc"])
    ensemble = metrics_from_probs(prob_sum / len(paths), labels)
    return {
        "members": members,
        "ensemble": ensemble,
        "accuracy_by_size": curve,  # ensemble accuracy (%) with the first k members, k = 1..M
        "disagreement": mean_pairwise_disagreement(torch.stack(predictions)),
        "best_member_acc": max(m["acc"] for m in members),
    }


def run_members(run_dir: str | Path, kind: str) -> tuple[dict[str, Any], list[Path]]:
    """(saved config, member files) of a run: kind 'fge' | 'sse' collected members, 'swa' the final
    weights then the SWA weights, 'final' the run's last checkpoint (independent runs)."""
    from fastflat.rundir import load_checkpoint

    run = Path(run_dir)
    state = load_checkpoint(run)  # UserError if not a run directory
    config = state["config"]
    if kind == "final":
        return config, [run / "checkpoint.pt"]
    pattern = {"fge": "fge-*.pt", "sse": "snapshot-*.pt", "swa": "swa.pt"}[kind]
    members = sorted((run / "members").glob(pattern))
    if not members:
        raise UserError(f"{run} has no {kind} members (members/{pattern}); was it trained with --method {kind}?")
    if kind == "sse" and config["sse"]["keep"]:
        members = members[-config["sse"]["keep"]:]
    if kind == "swa":
        members = [run / "checkpoint.pt", *members]
    return config, members
