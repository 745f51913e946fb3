"""Ensembles of saved models: accuracy, NLL, ECE of the ensemble and of each member, disagreement.

    report = evaluate_members(model, ["runs/x/members/fge-01.pt", ...], data.test, data)

Members are state_dict files loaded one at a time into one model, so memory holds one model plus the
running sum of probabilities (N, C) and each member's predicted class (M, N), whatever M is.
The ensemble averages the members' softmax outputs, as the snapshot-ensemble and FGE papers do.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable
from pathlib import Path
from statistics import mean
from typing import Any

import torch
from torch import Tensor, nn

from fastflat import data as datasets
from fastflat.errors import UserError, finite_state_or_raise
from fastflat.runs.rundir import load_weights

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


def load_member_state(path: str | Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """The state_dict in a member file (or a run's checkpoint.pt), or one UserError line."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)  # never unpickle code
    except FileNotFoundError:
        raise UserError(f"ensemble member {path} is missing") from None
    except Exception as e:  # truncated or foreign file
        raise UserError(f"ensemble member {path} is unreadable ({type(e).__name__})") from None
    if isinstance(state, dict) and "format" in state:  # a run's checkpoint.pt: the weights are under "model"
        state = state.get("model")
    if not isinstance(state, dict):
        raise UserError(f"ensemble member {path} holds no state_dict")
    finite_state_or_raise(state, f"ensemble member {path}")
    return state


def load_member(model: nn.Module, path: str | Path, device: torch.device) -> None:
    load_weights(model, load_member_state(path, device), f"ensemble member {path}", type(model).__name__)


_member_progress: contextvars.ContextVar = contextvars.ContextVar("member_progress", default=None)


@contextlib.contextmanager
def reporting_progress(callback: Callable[[int, int], None]):
    """Within this block every member evaluated calls callback(done, total) (the CLI's progress bar)."""
    token = _member_progress.set(callback)
    try:
        yield
    finally:
        _member_progress.reset(token)


def evaluate_members(model: nn.Module, paths: list[str | Path], split: datasets.Split,
                     dataset: datasets.Dataset, batch_size: int = 1024) -> dict[str, Any]:
    """Each member's metrics, the ensemble's, accuracy as members are added, and disagreement."""
    if not paths:
        raise UserError("no ensemble members to evaluate")
    device = split.labels.device
    labels = split.labels
    prob_sum: Tensor | None = None
    predictions, members, curve, nll_curve = [], [], [], []
    for k, path in enumerate(paths, start=1):
        load_member(model, path, device)
        probs = predict_probs(model, split, dataset, batch_size)
        prob_sum = probs if prob_sum is None else prob_sum + probs
        predictions.append(probs.argmax(1))
        members.append({"member": str(path), **metrics_from_probs(probs, labels)})
        so_far = metrics_from_probs(prob_sum / k, labels)
        curve.append(so_far["acc"])
        nll_curve.append(so_far["nll"])
        if (report := _member_progress.get()) is not None:
            report(k, len(paths))
    ensemble = metrics_from_probs(prob_sum / len(paths), labels)
    return {
        "members": members,
        "ensemble": ensemble,
        "accuracy_by_size": curve,  # ensemble accuracy (%) with the first k members, k = 1..M
        "nll_by_size": nll_curve,  # and its NLL
        "disagreement": mean_pairwise_disagreement(torch.stack(predictions)),
        "best_member_acc": max(m["acc"] for m in members),
    }


def validation_choice(model: nn.Module, paths: list[Path], validation: datasets.Split,
                      dataset: datasets.Dataset) -> dict[str, Any]:
    """What a user may choose without the test set, from a run's validation split (--val-split):
    each member's validation accuracy (in the order given, oldest first), the accuracy of the
    ensemble of the last k members for every k, the member to use alone, and the k to use.
    Both are chosen by accuracy; ties (likely on small splits) go to the lower NLL."""
    report = evaluate_members(model, paths[::-1], validation, dataset)  # newest first: curve = last k
    members = report["members"][::-1]
    best_member = max(range(len(paths)), key=lambda i: (members[i]["acc"], -members[i]["nll"]))
    last_k_acc, last_k_nll = report["accuracy_by_size"], report["nll_by_size"]
    best_k = max(range(1, len(paths) + 1), key=lambda k: (last_k_acc[k - 1], -last_k_nll[k - 1]))
    return {"size": len(validation), "member_acc": [m["acc"] for m in members], "last_k_acc": last_k_acc,
            "last_k_nll": last_k_nll, "best_member": str(paths[best_member]), "best_k": best_k}


def run_members(run_dir: str | Path, kind: str) -> tuple[dict[str, Any], list[Path]]:
    """(saved config, member files oldest first) of a run: kind 'fge' | 'sse' every collected member,
    'swa' the final weights then the SWA weights, 'final' the run's last checkpoint (independent runs)."""
    from fastflat.runs.rundir import load_checkpoint

    run = Path(run_dir)
    state = load_checkpoint(run)  # UserError if not a run directory
    config = state["config"]
    if kind == "final":
        return config, [run / "checkpoint.pt"]
    pattern = {"fge": "fge-*.pt", "sse": "snapshot-*.pt", "swa": "swa.pt"}[kind]
    members = sorted((run / "members").glob(pattern))
    if not members:
        raise UserError(f"{run} has no {kind} members (members/{pattern}); was it trained with --method {kind}?")
    if kind == "swa":
        members = [run / "checkpoint.pt", *members]
    return config, members


def snapshots_kept(config: dict[str, Any], sse_keep: int | str | None) -> int | str:
    """How many last snapshots a snapshot ensemble uses: the override, else the run's --sse-keep (0 = all;
    "auto": chosen on validation). A snapshot ensemble is its last k snapshots: later cycles trained longest."""
    return sse_keep if sse_keep is not None else config["sse"]["keep"]


def ensemble_report(model: nn.Module, kind: str, members: list[Path], config: dict[str, Any],
                    sse_keep: int | str | None, dataset: datasets.Dataset,
                    validation: datasets.Split | None) -> dict[str, Any]:
    """evaluate_members on the test split for the members a user asked for: a snapshot ensemble keeps
    its last k (sse_keep as in snapshots_kept, or 'auto': the k best on validation). With a
    validation split, the report also carries validation_choice over every member, and the test
    metrics of the member it picks to use alone."""
    keep = snapshots_kept(config, sse_keep) if kind == "sse" else 0
    if keep == "auto" and validation is None:
        raise UserError("--sse-keep auto chooses k on a validation split; the run was trained without --val-split")
    choice = validation_choice(model, members, validation, dataset) if validation is not None else None
    if kind == "sse":
        k = choice["best_k"] if keep == "auto" else keep
        members = members[-k:] if k else members
    report = evaluate_members(model, members, dataset.test, dataset)
    if choice is not None:  # the picked member's test metrics: from the report, else one more pass
        picked = [m for m in report["members"] if m["member"] == choice["best_member"]]
        scored = picked or evaluate_members(model, [Path(choice["best_member"])], dataset.test, dataset)["members"]
        choice["best_member_test"] = {k: scored[0][k] for k in ("acc", "nll", "ece")}
        report["validation"] = choice
    return report


Resolved = list[tuple[Path, dict[str, Any], list[Path]]]  # (run, saved config, every member file)


def budget_view(model: nn.Module, members: dict[str, Resolved], split: datasets.Split,
                dataset: datasets.Dataset, sse_keep: int | None = None) -> dict[str, Any]:
    """Test error (%) at 1, 2, 3... budgets for Ind, SSE and FGE, as in the FGE paper's tables.

    members: {"ind" | "sse" | "fge": [(run, config, files)]} from run_members, any of
    them empty (for "ind", kind "final"). The budget B is the epochs of
    the Ind runs (they must agree), or the shortest run's epochs when there are none. Ind at kB is the
    ensemble of the first k Ind runs, in the order given; an SSE or FGE run trained for kB epochs is one
    entry at kB, and several runs at one budget (seeds) are averaged. Each entry also carries the best
    single member's error over everything the run collected (ensembled or not): the number to beat.
    sse_keep: how many of each SSE run's last snapshots to ensemble, as in snapshots_kept.
    """
    everything = [entry for entries in members.values() for entry in entries]
    if not everything:
        raise UserError("the budget view needs runs: --from RUN (Ind), --sse RUN, --fge RUN, each repeatable")
    ind_epochs = sorted({config["epochs"] for _, config, _ in members.get("ind", [])})
    if len(ind_epochs) > 1:
        raise UserError(f"--from runs must share one budget; their epochs are {ind_epochs}")
    budget = ind_epochs[0] if ind_epochs else min(config["epochs"] for _, config, _ in everything)

    rows: dict[str, dict[int, dict[str, Any]]] = {}
    if members.get("ind"):
        report = evaluate_members(model, [p for _, _, paths in members["ind"] for p in paths], split, dataset)
        runs = [str(run) for run, _, _ in members["ind"]]
        rows["ind"] = {k: {"error": 100.0 - acc, "best_member_error": 100.0 - max(m["acc"] for m in report["members"][:k]),
                           "runs": runs[:k]} for k, acc in enumerate(report["accuracy_by_size"], start=1)}
    for kind in ("sse", "fge"):
        by_budget: dict[int, list[dict[str, Any]]] = {}
        for run, config, collected in members.get(kind, []):
            times, rest = divmod(config["epochs"], budget)
            if rest or times == 0:
                raise UserError(f"{run} trained {config['epochs']} epochs, not a multiple of the budget B = {budget} epochs")
            # every collected member, newest first: the curve's k-th point is the ensemble of the last k
            paths = collected[::-1]
            keep = snapshots_kept(config, sse_keep) if kind == "sse" else 0
            if keep == "auto":
                raise UserError(f"{run} was trained with --sse-keep auto; the budget view takes a number: --sse-keep K")
            keep = min(keep or len(paths), len(paths))
            report = evaluate_members(model, paths, split, dataset)
            by_budget.setdefault(times, []).append({"run": str(run), "error": 100.0 - report["accuracy_by_size"][keep - 1],
                                                    "best_member_error": 100.0 - report["best_member_acc"],
                                                    "members": keep, "collected": len(paths)})
        if by_budget:
            rows[kind] = {k: {"error": mean(e["error"] for e in entries),
                              "best_member_error": mean(e["best_member_error"] for e in entries),
                              "runs": [e["run"] for e in entries], "per_run": entries}
                          for k, entries in sorted(by_budget.items())}
    return {"kind": "budgets", "budget_epochs": budget, "rows": rows}


# -- the `fastflat ensemble` command's work, for any caller ------------------------------------------------
def _data_and_model(configs: list[dict[str, Any]], kind: str, device: str, data_dir: str | None):
    """The runs' shared dataset (with the first run's label noise, seed and validation split, rebuilt
    exactly as training held it out), a model of their architecture, and the device."""
    from fastflat.config import config_from_dict
    from fastflat.load import check_same_model_and_data, data_and_model
    from fastflat.loss.evaluation import resolve_device

    parsed = [config_from_dict(c) for c in configs]
    check_same_model_and_data([Path(f"run {i + 1}") for i in range(len(parsed))], parsed)
    cfg, dev = parsed[0], resolve_device(device)
    data, model = data_and_model(cfg, dev, data_dir)
    data, validation = datasets.hold_out_validation(data, cfg.val_split if kind in ("sse", "fge") else 0.0, cfg.seed)
    return data, validation, model, dev


def runs_report(kind: str, runs: list[str | Path], sse_keep: int | str | None = None, device: str = "auto",
                data_dir: str | None = None) -> dict[str, Any]:
    """The ensemble report of `runs` (kind 'fge' | 'sse' | 'swa': one run; 'final': independent runs)."""
    from fastflat.runs.rundir import provenance

    configs, paths = zip(*(run_members(run, kind) for run in runs))  # each checkpoint read once
    data, validation, model, dev = _data_and_model(list(configs), kind, device, data_dir)
    members = [p for group in paths for p in group]
    return {"kind": kind, "runs": [str(r) for r in runs],
            **ensemble_report(model, kind, members, configs[0], sse_keep, data, validation),
            "provenance": provenance(dev)}


def budget_report(groups: dict[str, list[str | Path]], sse_keep: int | None = None, device: str = "auto",
                  data_dir: str | None = None) -> dict[str, Any]:
    """budget_view over runs given by group: {"ind": [...], "sse": [...], "fge": [...]}."""
    from fastflat.runs.rundir import provenance

    resolved = {g: [(Path(r), *run_members(r, "final" if g == "ind" else g)) for r in rs] for g, rs in groups.items()}
    configs = [config for entries in resolved.values() for _, config, _ in entries]
    data, _, model, dev = _data_and_model(configs, "budgets", device, data_dir)
    return {**budget_view(model, resolved, data.test, data, sse_keep), "dataset": configs[0]["dataset"],
            "model": configs[0]["model"], "provenance": provenance(dev)}


def write_report(report: dict[str, Any], target: Path) -> None:
    """The JSON (strict: non-finite values become null) and its PNG beside it, each written atomically."""
    import json

    from fastflat.runs.rundir import json_safe
    from fastflat.analysis.plots import plot_budget_view, plot_ensemble_curve
    from fastflat.runs.rundir import atomic_write_text

    atomic_write_text(target, json.dumps(json_safe(report), indent=2, allow_nan=False) + "\n")
    plot = plot_budget_view if report["kind"] == "budgets" else plot_ensemble_curve
    plot(report, target.with_suffix(".png"))
