"""`fastflat train`, `runs` and `eval`: thin Typer commands that build a config and call the library. No math here.

    fastflat train --method sam --epochs 2          # Fashion-MNIST, small CNN, Rich progress
    fastflat eval runs/<run>/checkpoint.pt

Every user mistake (bad option, bad config, missing data, unreadable checkpoint) ends as one line on
stderr and exit code 2; `main` is the entry point that guarantees it, including for click's own
usage errors.
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from fastflat.cli.app import app, opt
from fastflat.cli.consoles import plural
from fastflat.cli.options import config_options, with_signature
from fastflat.config import GeneralConfig, load_config, option_keys
from fastflat.cli.consoles import console, err_console
from fastflat.cli.launch import interrupted_message, launch, stop_display, tell_launcher
from fastflat.errors import NonFiniteError, UserError

D = GeneralConfig()  # defaults of the general settings (the runs folder)
RUN = "Run"
COMMAND_OPTIONS = [  # the command's own options, after the generated settings
    inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
        Path | None, opt("YAML file of settings; options given here override it.", RUN)]),
    inspect.Parameter("resume", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
        Path | None, opt("Continue the run in this directory from its last checkpoint; auto: the latest interrupted "
                         "run in --out (of --name, if given).", RUN)]),
    inspect.Parameter("print_config", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=Annotated[
        bool, opt("Print the resolved config as YAML (defaults, --config file, options) and exit.", RUN)]),
    inspect.Parameter("nproc", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
        int | None, opt("Run N processes on this machine through torch.distributed.run (torchrun); the global "
                        "--batch-size is split over them.", RUN)]),
]


def train(**options: Any) -> None:
    """Train a model with one method and write a run directory (config, metrics, checkpoint, summary)."""
    _train(options.pop("config", None), options.pop("resume", None), options.pop("print_config", False),
           options.pop("nproc", None), options)


def _train(config: Path | None, resume: Path | None, print_config: bool, nproc: int | None, options: dict[str, Any]) -> None:
    from fastflat import loop as training
    from fastflat.cli.progress import RichHooks

    keys = option_keys()
    overrides = {keys[k]: v for k, v in options.items()}
    if nproc is not None:
        raise typer.Exit(launch(nproc, overrides.get("device") or D.device))
    if print_config:
        import yaml

        from fastflat.config import to_dict

        if resume is not None:
            from fastflat.runs.rundir import load_checkpoint

            print(yaml.safe_dump(load_checkpoint(resume)["config"], sort_keys=False), end="")
        else:
            from fastflat.methods import sections, sections_in_use

            cfg = load_config(config, overrides)
            unused = set(sections()) - set(sections_in_use(cfg))  # other methods' settings: noise here
            resolved = {k: v for k, v in to_dict(cfg).items() if k not in unused}
            print(yaml.safe_dump(resolved, sort_keys=False), end="")
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


app.command("train")(with_signature(train, config_options() + COMMAND_OPTIONS))


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

    table = Table(title=f"{plural(len(rows), 'run')} in {folder}")
    for column in ("run", "method", "model", "data", "epochs", "best test acc.", "final test acc.", "status"):
        table.add_column(column, justify="right" if "acc" in column or column == "epochs" else "left")
    colour = {"finished": "green", "failed": "red", "running": "cyan", "interrupted": "yellow", "unreadable": "red",
              "cut short": "yellow"}
    for r in rows:
        acc = lambda v: "-" if v is None else f"{v:.2f}%"  # noqa: E731
        state = r["status"] + (f": {r['error']}" if r.get("error") else " by --max-steps" if r["status"] == "cut short" else "")
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
    from fastflat.load import load_run
    from fastflat.loss.evaluation import evaluate

    run = load_run(checkpoint, device, data_dir)
    cfg, state, data, model = run.config, run.state, run.data, run.model
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
