"""`fastflat train`, `runs` and `eval`: thin Typer commands that build a config and call the library. No math here.

    fastflat train --method sam --epochs 2          # Fashion-MNIST, small CNN, Rich progress
    fastflat eval runs/<run>/checkpoint.pt

Every user mistake (bad option, bad config, missing data, unreadable checkpoint) ends as one line on
stderr and exit code 2; `main` is the entry point that guarantees it, including for click's own
usage errors.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer

from fastflat.config import (Amp, CurveConfig, CurveKind, FGEConfig, Fitness, FullBatchConfig, GradReg, InnerMethod, Method,
                             Mutation, Noise, OnNonFinite, SAMConfig, SAMNorm, Schedule, Shaping, SpartanConfig,
                             SSEConfig, SWAConfig, TrainConfig, load_config, option_keys)
from fastflat.cli.app import app, opt as _opt
from fastflat.cli.consoles import console, err_console
from fastflat.cli.launch import interrupted_message, launch, stop_display, tell_launcher
from fastflat.errors import NonFiniteError, UserError

D = TrainConfig()  # defaults shown in --help come from the config itself
S, W, E, F, P, B = SAMConfig(), SWAConfig(), SSEConfig(), FGEConfig(), SpartanConfig(), FullBatchConfig()
C = CurveConfig()


METHOD, SAM_P, OPTIM, DATA, RUN = "Method", "SAM", "Optimisation", "Data and model", "Run"
AVG = "SWA, snapshot ensembles, FGE"
EVO = "Spartan and ES"
FULL = "Full batch (--method fullbatch)"
CURVE = "Mode-connecting curve (--method curve; or fastflat curve)"


@app.command()
def train(
    method: Annotated[Method | None, _opt("Training method; swa, sse, fge and spartan wrap --inner.", METHOD, D.method)] = None,
    inner: Annotated[InnerMethod | None, _opt("Method that swa/sse/fge/spartan wrap.", METHOD, D.inner)] = None,
    init: Annotated[str | None, _opt("Start from this run directory's checkpoint (e.g. FGE from a trained model).", METHOD)] = None,
    swa: Annotated[bool | None, _opt("Add SWA on top of --method (e.g. SWA over SAM).", AVG, W.enabled)] = None,
    swa_start: Annotated[float | None, _opt("SWA starts: fraction of the budget (< 1) or epoch.", AVG, W.start)] = None,
    swa_lr: Annotated[float | None, _opt("SWA learning rate (cycle maximum alpha1).", AVG, W.lr)] = None,
    swa_lr_min: Annotated[float | None, _opt("Cyclic SWA: cycle minimum alpha2 (unset = constant LR).", AVG)] = None,
    swa_cycle: Annotated[int | None, _opt("SWA cycle c in iterations; average at each cycle end (0 = an epoch).", AVG, W.cycle)] = None,
    sse_cycles: Annotated[int | None, _opt("Snapshot ensembles: cosine cycles M (one snapshot each).", AVG, E.cycles)] = None,
    sse_keep: Annotated[str | None, _opt("Snapshot ensembles: ensemble the last k (0 = all; auto = the k best on --val-split).", AVG, E.keep)] = None,
    fge_pretrain: Annotated[float | None, _opt("FGE: share of the budget spent pretraining (ignored with --init).", AVG, F.pretrain)] = None,
    fge_cycle_epochs: Annotated[float | None, _opt("FGE: cycle length c in epochs (may be fractional; c is rounded to an even number of iterations).", AVG, F.cycle_epochs)] = None,
    fge_lr_max: Annotated[float | None, _opt("FGE: alpha1.", AVG, F.lr_max)] = None,
    fge_lr_min: Annotated[float | None, _opt("FGE: alpha2, the LR where models are collected.", AVG, F.lr_min)] = None,
    mutation: Annotated[Mutation | None, _opt("Spartan mutation.", EVO, P.mutation)] = None,
    mutate_every: Annotated[int | None, _opt("Epochs between mutation rounds.", EVO, P.mutate_every)] = None,
    children: Annotated[int | None, _opt("Children K per round (even with --antithetic).", EVO, P.children)] = None,
    es_noise: Annotated[Noise | None, _opt("ES noise (uniform: U[-1, 1]).", EVO, P.noise)] = None,
    sigma: Annotated[float | None, _opt("ES noise scale.", EVO, P.sigma)] = None,
    es_lr: Annotated[float | None, _opt("ES step size.", EVO, P.es_lr)] = None,
    antithetic: Annotated[bool | None, _opt("ES children in +/- pairs.", EVO, P.antithetic)] = None,
    shaping: Annotated[Shaping | None, _opt("ES reward shaping.", EVO, P.shaping)] = None,
    fitness: Annotated[Fitness | None, _opt("Fitness on the evolution split.", EVO, P.fitness)] = None,
    evolution_split: Annotated[float | None, _opt("Share of training data held out for fitness.", EVO, P.evolution_split)] = None,
    grad_lr: Annotated[float | None, _opt("grad mutation step scale.", EVO, P.grad_lr)] = None,
    temperature: Annotated[float | None, _opt("grad mutation temperature T0.", EVO, P.temperature)] = None,
    fitness_examples: Annotated[int | None, _opt("Examples of the evolution split scored per round (0 = all).", EVO, P.fitness_examples)] = None,
    chunk: Annotated[int | None, _opt("Children scored at once with vmap (1 = one at a time).", EVO, P.chunk)] = None,
    chunk_size: Annotated[int | None, _opt("Examples per forward/backward chunk of the full-batch pass (memory, not result).", FULL, B.chunk_size)] = None,
    gradreg: Annotated[GradReg | None, _opt("Gradient-norm penalty (tau/4)||grad L||^2: finite differences, or exact double backward.", FULL, B.gradreg)] = None,
    gradreg_strength: Annotated[float | None, _opt("s: tau = s * lr / 2 (the paper's code: 0.5).", FULL, B.strength)] = None,
    tau: Annotated[float | None, _opt("Set tau directly instead of tying it to the step size.", FULL)] = None,
    gradreg_eps: Annotated[float | None, _opt("Finite-difference step along g/||g||.", FULL, B.eps)] = None,
    gradreg_block: Annotated[int | None, _opt("Penalty per block of b examples, averaged (0 = whole set; the paper's strong reg.: 32).", FULL, B.block)] = None,
    shuffle_blocks: Annotated[bool | None, _opt("Re-draw which examples form the blocks every step.", FULL, B.shuffle)] = None,
    fixed_augment: Annotated[int | None, _opt("K > 0: K augmented copies of the training set, made once.", FULL, B.fixed_augment)] = None,
    curve_start: Annotated[str | None, _opt("Curve end point w1: a run directory or member file.", CURVE)] = None,
    curve_end: Annotated[str | None, _opt("Curve end point w2 (same model and dataset).", CURVE)] = None,
    curve_kind: Annotated[CurveKind | None, _opt("Curve through the trained bend.", CURVE, C.kind)] = None,
    rho: Annotated[float | None, _opt("SAM radius (>= 0).", SAM_P, S.rho)] = None,
    sam_norm: Annotated[SAMNorm | None, _opt("SAM ball.", SAM_P, S.norm)] = None,
    sam_adaptive: Annotated[bool | None, _opt("ASAM: scale the ball by |w|.", SAM_P, S.adaptive)] = None,
    sam_m: Annotated[int | None, _opt("m-sharpness: examples per perturbation (0 = whole batch).", SAM_P, S.m)] = None,
    sam_sync_ascent: Annotated[bool | None, _opt("torchrun: ascend with the gradient averaged over the ranks (default: each rank's own, m = per-rank batch).", SAM_P, S.sync_ascent)] = None,
    epochs: Annotated[int | None, _opt("Epochs to train.", OPTIM, D.epochs)] = None,
    max_steps: Annotated[int | None, _opt("Stop after N steps in all: a quick try (the LR schedule still spans --epochs; 0 = no cap).", OPTIM, D.max_steps)] = None,
    batch_size: Annotated[int | None, _opt("Examples per step (per accumulated batch with --accumulate; global under torchrun).", OPTIM, D.batch_size)] = None,
    sync_bn: Annotated[bool | None, _opt("torchrun: BatchNorm over the global batch, so N ranks train as one process would.", OPTIM, D.sync_bn)] = None,
    accumulate: Annotated[int | None, _opt("Gradient accumulation: a step averages K batches (SAM ascends with the whole accumulated gradient).", OPTIM, D.accumulate)] = None,
    lr: Annotated[float | None, _opt("Peak learning rate.", OPTIM, D.lr)] = None,
    momentum: Annotated[float | None, _opt("SGD momentum.", OPTIM, D.momentum)] = None,
    nesterov: Annotated[bool | None, _opt("Nesterov momentum.", OPTIM, D.nesterov)] = None,
    weight_decay: Annotated[float | None, _opt("L2 weight decay.", OPTIM, D.weight_decay)] = None,
    schedule: Annotated[Schedule | None, _opt("LR schedule (sgd, sam, es; swa/sse/fge set their own).", OPTIM, D.schedule)] = None,
    warmup_epochs: Annotated[float | None, _opt("Linear LR warmup, in epochs.", OPTIM, D.warmup_epochs)] = None,
    clip_grad: Annotated[float | None, _opt("Clip the gradient to this global L2 norm.", OPTIM)] = None,
    amp: Annotated[Amp | None, _opt("Mixed precision: bf16 autocast; fp16 autocast with a loss scale (CUDA; sgd, sam and swa/sse/fge over them).", OPTIM, D.amp)] = None,
    on_nonfinite: Annotated[OnNonFinite | None, _opt("NaN/inf loss or gradient: stop (exit 3, last finite checkpoint kept), skip the step, or roll back with half the LR.", RUN, D.on_nonfinite)] = None,
    model: Annotated[str | None, _opt("cnn | resnet18 | preact-resnet18 | wrn-D-K | vgg16-bn | torchvision:NAME | timm:NAME (pip install 'fastflat[timm]').", DATA, D.model)] = None,
    dataset: Annotated[str | None, _opt("fashion-mnist | mnist | cifar10 | cifar100 | synthetic (a small fixed 10-class set for tests) | folder:PATH (train/ and val/ or test/ class folders).", DATA, D.dataset)] = None,
    image_size: Annotated[int | None, _opt("folder:PATH datasets: resize images to this side.", DATA, D.image_size)] = None,
    data_dir: Annotated[str | None, _opt("Folder holding the dataset files.", DATA)] = None,
    label_noise: Annotated[float | None, _opt("Fraction of training labels to corrupt, fixed by --seed.", DATA, D.label_noise)] = None,
    val_split: Annotated[float | None, _opt("Share of training data held out for validation (choose k or a member without the test set).", DATA, D.val_split)] = None,
    seed: Annotated[int | None, _opt("Random seed (init, batch order, label noise).", RUN, D.seed)] = None,
    device: Annotated[str | None, _opt("auto | cpu | cuda | cuda:N.", RUN, D.device)] = None,
    out: Annotated[str | None, _opt("Parent folder of the run directory.", RUN, D.out)] = None,
    name: Annotated[str | None, _opt("Run directory name (default: method-dataset-model-seed-time).", RUN)] = None,
    checkpoint_every: Annotated[int | None, _opt("Also checkpoint every N steps (0 = each epoch).", RUN, D.checkpoint_every)] = None,
    eval_every: Annotated[int | None, _opt("Evaluate and checkpoint every N epochs (full batch: steps), and after the last.", RUN, D.eval_every)] = None,
    subset: Annotated[int | None, _opt("Train on a seeded random N training examples (0 = all).", DATA, D.subset)] = None,
    log_every: Annotated[int | None, _opt("A line of steps.jsonl (and steps.csv) every N steps: loss, accuracy, lr (0 = epochs only).", RUN, D.log_every)] = None,
    tensorboard: Annotated[bool | None, _opt("Also write TensorBoard scalars to RUN/tensorboard (pip install 'fastflat[tensorboard]').", RUN, D.tensorboard)] = None,
    trajectory_every: Annotated[int | None, _opt("Save the weights every N steps to trajectory/ (for fastflat landscape plane --trajectory; 0 = never).", RUN, D.trajectory_every)] = None,
    config: Annotated[Path | None, _opt("YAML file of settings; options given here override it.", RUN)] = None,
    resume: Annotated[Path | None, _opt("Continue the run in this directory from its last checkpoint; auto: the latest interrupted run in --out (of --name, if given).", RUN)] = None,
    print_config: Annotated[bool, _opt("Print the resolved config as YAML (defaults, --config file, options) and exit.", RUN)] = False,
    nproc: Annotated[int | None, _opt("Run N processes on this machine through torch.distributed.run (torchrun); the global --batch-size is split over them.", RUN)] = None,
) -> None:
    """Train a model with one method and write a run directory (config, metrics, checkpoint, summary)."""
    from fastflat import loop as training
    from fastflat.cli.progress import RichHooks

    keys = option_keys()
    overrides = {keys[k]: v for k, v in locals().items() if k in keys}
    if nproc is not None:
        raise typer.Exit(launch(nproc, overrides.get("device") or D.device))
    if print_config:
        import yaml

        from fastflat.config import to_dict

        if resume is not None:
            from fastflat.runs.rundir import load_checkpoint

            print(yaml.safe_dump(load_checkpoint(resume)["config"], sort_keys=False), end="")
        else:
            print(yaml.safe_dump(to_dict(load_config(config, overrides)), sort_keys=False), end="")
        return
    hooks = RichHooks(console) if os.environ.get("RANK", "0") == "0" else training.Hooks()  # torchrun: rank 0 speaks
    try:
        if resume is not None and str(resume) == "auto":
            from fastflat.runs.listing import latest_resumable

            resume = latest_resumable(overrides.pop("out", None) or D.out, overrides.pop("name", None))
            console.print(f"resuming {resume}", highlight=False)
        if resume is not None:
            extend = overrides.pop("epochs", None)  # the one setting a resume may change (where it can)
            given = sorted(k for k, v in overrides.items() if v is not None)
            if given or config is not None:
                raise UserError(f"--resume continues with the run's saved config (only --epochs may extend it); "
                                f"drop {', '.join(given) or '--config'}")
            summary = training.resume(resume, hooks, epochs=extend)
        else:
            summary = training.train(load_config(config, overrides), hooks)
    except KeyboardInterrupt as e:
        stop_display(hooks)
        if isinstance(hooks, RichHooks):  # rank 0 speaks for all (the others have plain Hooks)
            message = interrupted_message(e, hooks.run_dir)
            err_console.print(message, highlight=False, markup=False, soft_wrap=True)
            tell_launcher(message)
        raise typer.Exit(130) from None
    except NonFiniteError as e:
        stop_display(hooks)
        if isinstance(hooks, RichHooks):
            err_console.print(f"error: {e}", highlight=False, markup=False, soft_wrap=True)
        raise typer.Exit(3) from None
    except UserError:
        stop_display(hooks)
        raise
    from fastflat.ops import dist

    dist.finish()
    if isinstance(hooks, RichHooks):
        hooks.print_summary(summary)


@app.command("runs")
def runs_command(
    folder: Annotated[Path, typer.Argument(help="A folder of run directories (train's --out).")] = Path(D.out),
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON list instead of a table.")] = False,
) -> None:
    """List the runs in a folder: method, model, data, epochs done, best and final test accuracy, status."""
    from fastflat.runs.listing import list_runs

    rows = list_runs(folder)
    if as_json:
        print(json.dumps(rows))
        return
    from rich.table import Table

    table = Table(title=f"{len(rows)} runs in {folder}")
    for column in ("run", "method", "model", "data", "epochs", "best test acc.", "final test acc.", "status"):
        table.add_column(column, justify="right" if "acc" in column or column == "epochs" else "left")
    colour = {"finished": "green", "failed": "red", "running": "cyan", "interrupted": "yellow"}
    for r in rows:
        acc = lambda v: "-" if v is None else f"{v:.2f}%"  # noqa: E731
        state = r["status"] + (f": {r['error']}" if r.get("error") else "")
        table.add_row(r["run"], str(r["method"]), str(r["model"]), str(r["dataset"]), f"{r['epochs_done']}/{r['epochs']}",
                      acc(r["best_test_acc"]), acc(r["final_test_acc"]), f"[{colour.get(r['status'], 'white')}]{state}")
    console.print(table)


@app.command("eval")
def evaluate_checkpoint(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint.pt, or the run directory holding one.")],
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N.")] = "auto",
    data_dir: Annotated[str | None, typer.Option(help="Folder holding the dataset files.")] = None,
    batch_size: Annotated[int, typer.Option(help="Examples per evaluation batch.")] = 1024,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")] = False,
) -> None:
    """Report test accuracy and loss of a saved checkpoint (loaded into a plain, unflattened model)."""
    from fastflat import data as datasets
    from fastflat.config import config_from_dict
    from fastflat.data.models import build_model
    from fastflat.runs.rundir import load_checkpoint
    from fastflat.loss.evaluation import evaluate, resolve_device

    state = load_checkpoint(checkpoint)
    cfg = config_from_dict(state["config"])
    dev = resolve_device(device)
    data = datasets.load_dataset(cfg.dataset, data_dir or cfg.data_dir, dev, cfg.label_noise, cfg.seed,
                                  image_size=cfg.image_size)
    model = build_model(cfg.model, data.in_channels, data.num_classes, data.image_size).to(dev)
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, KeyError) as e:
        raise UserError(f"checkpoint {checkpoint} does not fit model {cfg.model}: {str(e).splitlines()[0]}") from None
    result = {"checkpoint": str(checkpoint), "method": cfg.method, "model": cfg.model, "dataset": cfg.dataset,
              "epoch": state["position"]["epoch"], **{f"test_{k}": v for k, v in
                                                       evaluate(model, data.test, data, batch_size).items()}}
    if as_json:
        print(json.dumps(result))
        return
    from rich.table import Table

    table = Table(title=f"{cfg.method} / {cfg.model} / {cfg.dataset} after epoch {result['epoch']}")
    table.add_column("test accuracy", justify="right")
    table.add_column("test loss", justify="right")
    table.add_row(f"{result['test_acc']:.2f}%", f"{result['test_loss']:.4f}")
    console.print(table)
