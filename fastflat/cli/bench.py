"""`fastflat bench kernels` and `fastflat bench train`: thin Typer commands over fastflat.bench.

    fastflat bench kernels --sizes 2^20,2^24 --models resnet18 --dtypes fp32,bf16
    fastflat bench train --model resnet18 --methods sgd,sam --steps 20

Both print a Rich table and write JSON + CSV rows to --out (see benchmarks/README.md for the columns).
"""

from __future__ import annotations

from typing import Annotated

import torch
import typer

from fastflat.bench.registry import OPS, PROVIDERS
from fastflat.bench.workloads import DTYPES, MODEL_WORKLOADS
from fastflat.cli.consoles import console, err_console
from fastflat.cli.launch import launch
from fastflat.errors import UserError

bench_app = typer.Typer(rich_markup_mode="rich", add_completion=False,
                        help="Benchmark the fused ops against their baselines, and whole training steps.")

OUT = "runs"  # as every command; the rows committed with fastflat are under benchmarks/results
CPU_SIZES, GPU_SIZES, QUICK_SIZES = "2^16,2^20,2^22", "2^16,2^20,2^24,2^26", "2^16,2^20"
# Defaults sized by device: on a CPU, torch.compile costs seconds of compilation per (op, size, dtype)
# and bf16 is not the case anyone tunes there, so a CPU run times fp32 without compile unless asked.
CPU_PROVIDERS = "loop,foreach,flat-torch,triton"


def _names(text: str, allowed: tuple[str, ...] | None, option: str) -> list[str]:
    """'a,b' -> ['a', 'b'], each checked against `allowed` (None: anything goes); 'none' -> []."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if names == ["none"]:
        return []
    bad = [n for n in names if allowed is not None and n not in allowed]
    if bad:
        raise UserError(f"{option}: unknown {', '.join(map(repr, bad))}; choose from {', '.join(allowed)}")
    return names


def _device(name: str) -> torch.device:
    from fastflat.loss.evaluation import resolve_device

    return resolve_device(name)


SIZES_HELP = f"Flat vector sizes, e.g. 2^16,2^20 (default: CPU {CPU_SIZES}; GPU {GPU_SIZES}); none to skip."
MODELS_HELP = (f"Real parameter lists: {', '.join(MODEL_WORKLOADS)} or any --model name "
               "(default: CPU cnn; GPU all three); none to skip.")


@bench_app.command("kernels")
def kernels(
    sizes: Annotated[str | None, typer.Option(help=SIZES_HELP)] = None,
    models: Annotated[str | None, typer.Option(help=MODELS_HELP)] = None,
    dtypes: Annotated[str | None, typer.Option(help=f"Storage dtypes: {', '.join(DTYPES)} (default: GPU fp32,bf16; CPU fp32).")] = None,
    ops: Annotated[str, typer.Option(help=f"Ops: {', '.join(OPS)}.")] = ",".join(OPS),
    providers: Annotated[str | None, typer.Option(help=f"Providers: {', '.join(PROVIDERS)} (default: all on a GPU; {CPU_PROVIDERS} on a CPU).")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N.")] = "auto",
    out: Annotated[str, typer.Option(help="Folder for the JSON and CSV results (never overwritten).")] = OUT,
    quick: Annotated[bool, typer.Option(help=f"Short timing, sizes {QUICK_SIZES} and no model lists unless given, no torch.compile on CPU: a smoke run.")] = False,
    fmt: Annotated[str, typer.Option("--format", help="table (Rich) | csv | json (every field, unrounded, on stdout).")] = "table",
) -> None:
    """Time each op per provider (loop, foreach, compile, flat-torch, triton) against copy bandwidth."""
    from fastflat.bench.kernels import KernelSettings, run_kernels
    from fastflat.bench.workloads import model_workload, size_workload

    _check_format(fmt)
    dev = _device(device)
    on_gpu = dev.type == "cuda"
    size_list = _names(sizes or (QUICK_SIZES if quick else GPU_SIZES if on_gpu else CPU_SIZES), None, "--sizes")
    model_list = _names(models or ("none" if quick else ",".join(MODEL_WORKLOADS) if on_gpu else "cnn"),
                        None, "--models")  # CPU: ResNet-18's 11M parameters take minutes per op there
    dtypes = dtypes or ("fp32,bf16" if on_gpu else "fp32")
    providers = providers or (",".join(PROVIDERS) if on_gpu else CPU_PROVIDERS)
    workloads = [size_workload(s) for s in size_list] + [model_workload(m) for m in model_list]
    if not workloads:
        raise UserError("--sizes and --models are both empty: nothing to benchmark")
    settings = KernelSettings(ops=_names(ops, tuple(OPS), "--ops"), workloads=workloads,
                              dtypes=_names(dtypes, tuple(DTYPES), "--dtypes"),
                              providers=_names(providers, PROVIDERS, "--providers"), device=dev, quick=quick)
    say = console if fmt == "table" else err_console  # csv/json own stdout
    rows = run_kernels(settings, on_workload=lambda text: say.print(f"[dim]benchmarking {text}[/dim]"))
    floors = {name: {"summary": OPS[name].summary, "floor_elements": OPS[name].floor,
                     "floor_counted_as": OPS[name].floor_detail} for name in settings.ops}
    _report("kernels", dev, rows, out, {"sizes": size_list, "models": model_list, "dtypes": settings.dtypes,
                                        "providers": settings.providers, "quick": quick, "ops": floors}, fmt)


@bench_app.command("train")
def train(
    model: Annotated[str | None, typer.Option(help="cnn | resnet18 | preact-resnet18 | wrn-D-K | vgg16-bn "
                                              "(default: resnet18 on a GPU, cnn on a CPU).")] = None,
    methods: Annotated[str, typer.Option(help="Methods to time; unknown ones show as unavailable.")] = "sgd,sam",
    steps: Annotated[int | None, typer.Option(min=1, help="Timed steps (and fwd+bwd passes) per method [default: 20; "
                                              "--quick 5].")] = None,
    warmup: Annotated[int | None, typer.Option(min=0, help="Untimed steps first [default: 3; --quick 1].")] = None,
    quick: Annotated[bool, typer.Option(help="A smoke run: 5 timed steps after 1 untimed, the small CNN unless "
                                        "--model is given.")] = False,
    batch_size: Annotated[int, typer.Option(min=1, help="Examples per step.")] = 128,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N.")] = "auto",
    out: Annotated[str, typer.Option(help="Folder for the JSON and CSV results (never overwritten).")] = OUT,
    fmt: Annotated[str, typer.Option("--format", help="table (Rich) | csv | json (every field, unrounded, on stdout).")] = "table",
    nproc: Annotated[int | None, typer.Option(help="Time the steps in N processes (torchrun, the batch split over them; gloo on CPU).")] = None,
) -> None:
    """Steps/s and samples/s per method on a synthetic 3x32x32 batch, SAM/SGD time, time outside fwd+bwd."""
    from fastflat.ops import dist
    from fastflat.bench.train import TrainSettings, run_train

    _check_format(fmt)
    if nproc is not None and not dist.launched():
        raise typer.Exit(launch(nproc, device))
    dist.init_from_env(device)
    if batch_size % dist.world_size():
        raise UserError(f"--batch-size {batch_size} does not split over {dist.world_size()} processes")
    dev = _device(device)
    model = model or ("resnet18" if dev.type == "cuda" and not quick else "cnn")
    steps = steps or (5 if quick else 20)
    warmup = (1 if quick else 3) if warmup is None else warmup
    settings = TrainSettings(model=model, methods=_names(methods, None, "--methods"), steps=steps,
                             batch_size=batch_size, warmup=warmup, device=dev)
    say = console if fmt == "table" else err_console  # csv/json own stdout
    rows = run_train(settings, on_method=lambda name: dist.is_main() and say.print(f"[dim]timing {name} on {model}[/dim]"))
    if dist.is_main():  # rank 0's timings speak for the job (every step ends in the same all-reduce)
        _report("train", dev, rows, out, {"model": model, "methods": settings.methods, "steps": steps,
                                          "warmup": warmup, "batch_size": batch_size,
                                          "processes": dist.world_size()}, fmt)
    dist.finish()


@bench_app.command("recipe")
def recipe(
    seeds: Annotated[str, typer.Option(help="Seeds, comma-separated: every contender trains once per seed.")] = "0",
    contenders: Annotated[str, typer.Option(help="old-sam (the main job before: cnn, batch 128, lr 0.05, 2 epochs), "
                                            "sam and sgd (today's defaults), plain-sgd (the sgd recipe in a plain "
                                            "PyTorch loop: the overhead check).")] = "old-sam,sam,sgd,plain-sgd",
    dataset: Annotated[str, typer.Option(help="Dataset (the goals are set on fashion-mnist).")] = "fashion-mnist",
    data_dir: Annotated[str | None, typer.Option(help="Folder holding the dataset files.")] = None,
    max_steps: Annotated[int, typer.Option(min=0, help="Cap every run at N steps: a smoke run (0 = whole budgets).")] = 0,
    out: Annotated[str, typer.Option(help="Folder for the JSON, CSV and PNG results (never overwritten); the runs go "
                                     "under OUT/bench-recipe.")] = OUT,
) -> None:
    """Time to accuracy: test accuracy at each epoch's end against training seconds, for the old main job, the
    default sam and sgd runs and a plain PyTorch loop, in one run, a line per epoch. About 4.5 minutes a seed on 2
    CPU cores (the old main job alone takes over 2); --max-steps 20 is a smoke run of seconds."""
    from rich.table import Table

    from fastflat.bench import report
    from fastflat.bench.recipe import TARGET_ACC, RecipeSettings, plot_time_to_accuracy, run_recipe, summarize

    seed_list = _seed_list(seeds)
    extra = {"max_steps": max_steps} if max_steps else {}
    settings = RecipeSettings(seeds=seed_list, contenders=_names(contenders, None, "--contenders"), dataset=dataset,
                              data_dir=data_dir, extra=extra, out=out)
    rows = run_recipe(settings, on_run=lambda text: console.print(f"[dim]{text}[/dim]"))
    dev = torch.device("cpu")
    rows = report.with_provenance(rows, dev)
    summary = summarize(rows)
    table = Table(title=f"time to accuracy on {dataset}, {len(seed_list)} seed(s), {rows[0]['device']}")
    for column in ("contender", "test acc %", "training s", "x old-sam", f"s to {TARGET_ACC:g}%", "command"):
        table.add_column(column, justify="left" if column in ("contender", "command") else "right")
    for r in summary:
        spread = f" ± {r['test_acc_std']:.2f}" if r["seeds"] > 1 else ""
        reach, hits = r[f"seconds_to_{TARGET_ACC:g}"], r[f"seeds_reaching_{TARGET_ACC:g}"]
        some = f" ({hits} of {r['seeds']} seeds)" if 0 < hits < r["seeds"] else ""
        table.add_row(r["contender"], f"{r['test_acc']:.2f}{spread}", f"{r['seconds']:.1f}",
                      "-" if r["x_baseline"] is None else f"{r['x_baseline']:.2f}",
                      "not reached" if reach is None else f"{reach:.1f}{some}", r["command"])
    console.print(table)
    report.print_provenance(console, rows)
    json_path, csv_path = report.write_results(out, "recipe", dev, rows, {"seeds": seed_list, "dataset": dataset,
                                                                           "contenders": settings.contenders,
                                                                           "max_steps": max_steps, "summary": summary})
    try:
        plot = json_path.with_suffix(".png")
        plot_time_to_accuracy(rows, plot, f"time to accuracy, {dataset}, {rows[0]['device']}")
        console.print(f"wrote {json_path}, {csv_path} and {plot}")
    except ImportError:
        console.print(f"wrote {json_path} and {csv_path} (no plot: matplotlib is not installed)")


@bench_app.command("es-memory")
def es_memory(
    children: Annotated[str, typer.Option(help="Numbers of children K to compare.")] = "8,512",
    size: Annotated[str, typer.Option(help="Parameters N (fp32), e.g. 2^20 (CPU) or 11_173_962 (ResNet-18).")] = "2^20",
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N.")] = "auto",
    out: Annotated[str, typer.Option(help="Folder for the JSON and CSV results (never overwritten).")] = OUT,
) -> None:
    """Peak memory of the fused ES reduction for each K: O(N), not K x N."""
    from rich.table import Table

    from fastflat.bench import report
    from fastflat.bench.memory import es_peak_memory
    from fastflat.bench.workloads import parse_size

    dev = _device(device)
    ks = [int(k) for k in _names(children, None, "--children")]
    n = parse_size(size)
    rows = report.with_provenance(es_peak_memory(ks, n, dev), dev)
    table = Table(title=f"ES weighted reduction, N = {n:,} fp32, {rows[0]['device']}")
    for column in ("K", "peak extra memory", "per parameter", "a stored K x N noise matrix"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(str(r["children"]), f"{r['peak_extra_bytes'] / 2**20:.1f} MiB",
                      f"{r['peak_extra_per_param']:.1f} B", f"{r['stored_noise_bytes'] / 2**20:,.0f} MiB")
    console.print(table)
    json_path, csv_path = report.write_results(out, "es-memory", dev, rows, {"children": ks, "size": n})
    console.print(f"wrote {json_path} and {csv_path}")


def _seed_list(seeds: str) -> list[int]:
    try:
        seed_list = [int(s) for s in _names(seeds, None, "--seeds")]
    except ValueError:
        raise UserError(f"--seeds takes integers, e.g. 0,1,2; got {seeds!r}") from None
    if not seed_list:
        raise UserError("--seeds is empty: give at least one seed")
    return seed_list


@bench_app.command("hessian")
def hessian(
    model: Annotated[str, typer.Option(help="Model name (as train --model); ignored with --checkpoint.")] = "fastcnn",
    dataset: Annotated[str, typer.Option(help="Dataset whose first N training examples define the loss.")] = "fashion-mnist",
    checkpoint: Annotated[str | None, typer.Option(help="A run directory or member file: measure at trained weights "
                                                   "(default: the model at initialisation).")] = None,
    examples: Annotated[int, typer.Option(min=1, help="N training examples.")] = 1024,
    repeats: Annotated[int, typer.Option(min=1, help="Timed gradients and HVPs (median).")] = 5,
    tol: Annotated[float, typer.Option(help="Relative tolerance of both solvers (PyHessian's default: 1e-3).")] = 1e-3,
    seeds: Annotated[str, typer.Option(help="Start-vector seeds, comma-separated: every solver runs once per seed "
                                            "(the published tables: 0,1,2,3,4).")] = "0,1,2",
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N.")] = "auto",
    out: Annotated[str, typer.Option(help="Folder for the JSON and CSV results (never overwritten).")] = OUT,
) -> None:
    """One Hessian-vector product against one gradient; the top eigenvalue by our Lanczos against PyHessian."""
    from rich.table import Table

    from fastflat.bench import report
    from fastflat.bench.hessian import run_hessian, summarise
    from fastflat.cli.progress import staged_progress

    dev, seed_list = _device(device), tuple(_seed_list(seeds))
    with staged_progress(err_console) as progress:
        rows = run_hessian(model, dataset, examples, dev, repeats, tol, checkpoint, seeds=seed_list, progress=progress)
    rows = report.with_provenance(rows, dev)
    r = rows[0]
    table = Table(title=f"Hessian-vector products: {r['model']} ({r['weights']}) on {examples:,} {r['dataset']} "
                        f"examples, {r['device']}")
    for column in ("params", "gradient ms", "HVP ms, graph rebuilt", "HVP ms, graph kept", "rebuilt HVP / gradient"):
        table.add_column(column, justify="right")
    table.add_row(f"{r['params']:,}", f"{r['grad_ms']:.1f}", f"{r['hvp_ms']:.1f}", f"{r['hvp_kept_ms']:.1f}",
                  f"{r['hvp_over_grad']:.2f}")
    console.print(table)
    solvers = Table(title=f"top eigenvalue, tolerance {tol:g} (reference {r['reference_eigenvalue']:.6g}: Lanczos "
                          "to a residual of 1e-10)")
    for column in ("solver", "start seed", "HVPs", "relative error", "seconds"):
        solvers.add_column(column, justify="left" if column == "solver" else "right")
    for row in rows:
        if row["status"] != "ok":
            solvers.add_row(row["solver"], str(row["seed"]), "-", f"[dim]{row['reason']}[/dim]", "-")
            continue
        hvps = f"{row['hvps']:.2f} ({row['full_hvps']} + {row['start_hvps']} on {row['start_examples']})" \
            if row["start_hvps"] else str(row["hvps"])
        solvers.add_row(row["solver"], str(row["seed"]), hvps, f"{row['rel_error']:.1e}", f"{row['seconds']:.1f}")
    console.print(solvers)
    means = Table(title=f"over {len({row['seed'] for row in rows})} seeds (a product on the subsample counts as its "
                        "share of the examples)")
    for column in ("solver", "mean HVPs", "of PyHessian's", "median error", "largest error", "mean seconds"):
        means.add_column(column, justify="left" if column == "solver" else "right")
    for m in summarise(rows):
        ratio = f"{m['hvps_over_baseline']:.2f}x" if m["hvps_over_baseline"] is not None else "-"
        means.add_row(m["solver"], f"{m['mean_hvps']:.2f}", ratio, f"{m['median_rel_error']:.1e}",
                      f"{m['max_rel_error']:.1e}", f"{m['mean_seconds']:.1f}")
    console.print(means)
    json_path, csv_path = report.write_results(out, "hessian", dev, rows, {"model": r["model"], "dataset": r["dataset"],
                                                                             "examples": examples, "repeats": repeats,
                                                                             "tol": tol, "checkpoint": checkpoint})
    console.print(f"wrote {json_path} and {csv_path}")


@bench_app.command("landscape")
def landscape(
    model: Annotated[str, typer.Option(help="Model name (as train --model).")] = "cnn",
    dataset: Annotated[str, typer.Option(help="Dataset the points are scored on.")] = "fashion-mnist",
    examples: Annotated[int, typer.Option(min=1, help="Examples per point (seeded train and test subsets).")] = 1000,
    grid: Annotated[int, typer.Option(min=2, help="Points per side of the plane (grid x grid points).")] = 4,
    at_once: Annotated[str, typer.Option(help="Points per vmapped call to try, comma-separated.")] = "4,16",
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N.")] = "auto",
    out: Annotated[str, typer.Option(help="Folder for the JSON and CSV results (never overwritten).")] = OUT,
) -> None:
    """Points per second of a landscape grid: our scoring (per point and vmapped) against the per-parameter loop."""
    from rich.table import Table

    from fastflat.bench import report
    from fastflat.bench.landscape import run_landscape

    ks = tuple(int(k) for k in at_once.split(",") if k.strip())
    if not ks or min(ks) < 1:
        raise UserError(f"--at-once takes counts >= 1, e.g. 4,16; got {at_once!r}")
    dev = _device(device)
    rows = report.with_provenance(run_landscape(model, dataset, examples, grid, dev, ks), dev)
    table = Table(title=f"landscape grid: {grid}x{grid} points of {model} on {examples:,} {dataset} examples, "
                        f"BatchNorm re-estimated per point, {rows[0]['device']}")
    for column in ("variant", "points/s", "x loop", "max |train loss - loop's|"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    for r in rows:
        table.add_row(r["variant"], f"{r['points_per_s']:.2f}", f"{r['speedup_vs_loop']:.2f}",
                      f"{r['max_train_loss_diff_vs_loop']:.2g}")
    console.print(table)
    json_path, csv_path = report.write_results(out, "landscape", dev, rows, {"model": model, "dataset": dataset,
                                                                               "examples": examples, "grid": grid})
    console.print(f"wrote {json_path} and {csv_path}")


def _check_format(fmt: str) -> None:
    if fmt not in ("table", "csv", "json"):
        raise UserError(f"--format takes table, csv or json, not {fmt!r}")


def _report(benchmark: str, device: torch.device, rows: list[dict], out: str, settings: dict,
            fmt: str = "table") -> None:
    from fastflat.bench import report

    rows = report.with_provenance(rows, device)
    warnings = report.noise_warnings(rows)
    if fmt != "table":
        report.print_rows(rows, fmt)
        report.write_results(out, benchmark, device, rows, settings)
        return
    if benchmark == "kernels":
        console.print(report.kernel_table(rows))
        report.print_notes(console, rows)
    else:
        console.print(report.train_table(rows))
    for line in warnings:
        console.print(f"[yellow]untrustworthy, {line}[/yellow]", highlight=False)
    report.print_provenance(console, rows)
    json_path, csv_path = report.write_results(out, benchmark, device, rows, settings)
    console.print(f"wrote {json_path} and {csv_path}")
