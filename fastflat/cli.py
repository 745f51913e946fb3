"""The `fastflat` command: thin Typer commands that build a config and call the library. No math here.

    fastflat train --method sam --epochs 2          # Fashion-MNIST, small CNN, Rich progress
    fastflat eval runs/<run>/checkpoint.pt

Every user mistake (bad option, bad config, missing data, unreadable checkpoint) ends as one line on
stderr and exit code 2; `main` is the entry point that guarantees it, including for click's own
usage errors.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from fastflat.config import AMP_MODES, METHODS, SCHEDULES, SAMConfig, TrainConfig, load_config
from fastflat.errors import UserError

try:  # typer >= 0.29 vendors click; older typer depends on it
    from typer._click.exceptions import NoArgsIsHelpError, UsageError
except ImportError:
    from click.exceptions import NoArgsIsHelpError, UsageError

app = typer.Typer(
    name="fastflat", no_args_is_help=True, rich_markup_mode="rich", add_completion=False,
    help="Train toward flat minima (SGD, SAM) with fused Triton kernels.",
)
console = Console()
err_console = Console(stderr=True)

D = TrainConfig()  # defaults shown in --help come from the config itself
S = SAMConfig()


def _opt(help: str, panel: str, default: Any = None, **kw) -> Any:
    shown = f" [dim]\\[default: {default}][/dim]" if default is not None else ""
    return typer.Option(help=help + shown, rich_help_panel=panel, show_default=False, **kw)


METHOD, SAM_P, OPTIM, DATA, RUN = "Method", "SAM", "Optimisation", "Data and model", "Run"


@app.command()
def train(
    method: Annotated[str | None, _opt(f"Training method: {' | '.join(METHODS)}.", METHOD, D.method)] = None,
    rho: Annotated[float | None, _opt("SAM radius (>= 0).", SAM_P, S.rho)] = None,
    sam_norm: Annotated[str | None, _opt("SAM ball: l2 | linf.", SAM_P, S.norm)] = None,
    sam_adaptive: Annotated[bool | None, _opt("ASAM: scale the ball by |w|.", SAM_P, S.adaptive)] = None,
    sam_m: Annotated[int | None, _opt("m-sharpness: examples per perturbation (0 = whole batch).", SAM_P, S.m)] = None,
    epochs: Annotated[int | None, _opt("Epochs to train.", OPTIM, D.epochs)] = None,
    batch_size: Annotated[int | None, _opt("Examples per step.", OPTIM, D.batch_size)] = None,
    lr: Annotated[float | None, _opt("Peak learning rate.", OPTIM, D.lr)] = None,
    momentum: Annotated[float | None, _opt("SGD momentum.", OPTIM, D.momentum)] = None,
    nesterov: Annotated[bool | None, _opt("Nesterov momentum.", OPTIM, D.nesterov)] = None,
    weight_decay: Annotated[float | None, _opt("L2 weight decay.", OPTIM, D.weight_decay)] = None,
    schedule: Annotated[str | None, _opt(f"LR schedule: {' | '.join(SCHEDULES)}.", OPTIM, D.schedule)] = None,
    warmup_epochs: Annotated[float | None, _opt("Linear LR warmup, in epochs.", OPTIM, D.warmup_epochs)] = None,
    clip_grad: Annotated[float | None, _opt("Clip the gradient to this global L2 norm.", OPTIM)] = None,
    amp: Annotated[str | None, _opt(f"Mixed precision: {' | '.join(AMP_MODES)}.", OPTIM, D.amp)] = None,
    model: Annotated[str | None, _opt("cnn | resnet18 | preact-resnet18 | wrn-D-K | vgg16-bn.", DATA, D.model)] = None,
    dataset: Annotated[str | None, _opt("fashion-mnist | mnist | cifar10 | cifar100 | synthetic.", DATA, D.dataset)] = None,
    data_dir: Annotated[str | None, _opt("Folder holding the dataset files.", DATA)] = None,
    label_noise: Annotated[float | None, _opt("Fraction of training labels to corrupt, fixed by --seed.", DATA, D.label_noise)] = None,
    seed: Annotated[int | None, _opt("Random seed (init, batch order, label noise).", RUN, D.seed)] = None,
    device: Annotated[str | None, _opt("auto | cpu | cuda | cuda:N.", RUN, D.device)] = None,
    out: Annotated[str | None, _opt("Parent folder of the run directory.", RUN, D.out)] = None,
    name: Annotated[str | None, _opt("Run directory name (default: method-dataset-model-seed-time).", RUN)] = None,
    checkpoint_every: Annotated[int | None, _opt("Also checkpoint every N steps (0 = each epoch).", RUN, D.checkpoint_every)] = None,
    config: Annotated[Path | None, _opt("YAML file of settings; options given here override it.", RUN)] = None,
    resume: Annotated[Path | None, _opt("Continue the run in this directory from its last checkpoint.", RUN)] = None,
) -> None:
    """Train a model with one method and write a run directory (config, metrics, checkpoint, summary)."""
    from fastflat import train as training
    from fastflat.progress import RichHooks

    overrides = {k: v for k, v in locals().items() if k not in ("config", "resume", "training", "RichHooks")}
    sam_keys = {"rho": "sam.rho", "sam_norm": "sam.norm", "sam_adaptive": "sam.adaptive", "sam_m": "sam.m"}
    overrides = {sam_keys.get(k, k): v for k, v in overrides.items()}
    hooks = RichHooks(console)
    try:
        if resume is not None:
            given = sorted(k for k, v in overrides.items() if v is not None)
            if given or config is not None:
                raise UserError(f"--resume continues with the run's saved config; drop {', '.join(given) or '--config'}")
            summary = training.resume(resume, hooks)
        else:
            summary = training.train(load_config(config, overrides), hooks)
    except KeyboardInterrupt:
        hooks.stop()
        run_dir = hooks.run_dir or "the run directory"
        err_console.print(f"interrupted: checkpoint saved; continue with: fastflat train --resume {run_dir}")
        raise typer.Exit(130) from None
    hooks.print_summary(summary)


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
    from fastflat.models import build_model
    from fastflat.rundir import load_checkpoint
    from fastflat.train import evaluate, resolve_device

    state = load_checkpoint(checkpoint)
    cfg = config_from_dict(state["config"])
    dev = resolve_device(device)
    data = datasets.load_dataset(cfg.dataset, data_dir or cfg.data_dir, dev, cfg.label_noise, cfg.seed)
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


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the app; user errors become one stderr line and exit code 2."""
    command = typer.main.get_command(app)
    try:
        result = command.main(args=argv, prog_name="fastflat", standalone_mode=False)
    except NoArgsIsHelpError as e:
        console.print(e.ctx.get_help())
        return 0
    except UsageError as e:
        name = e.ctx.command_path if e.ctx is not None else "fastflat"
        err_console.print(f"error: {e.format_message()} (see: {name} --help)", highlight=False, markup=False, soft_wrap=True)
        return 2
    except UserError as e:
        err_console.print(f"error: {e}", highlight=False, markup=False, soft_wrap=True)
        return 2
    except typer.Exit as e:
        return e.exit_code
    except typer.Abort:
        return 130
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
