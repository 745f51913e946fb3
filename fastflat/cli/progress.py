"""Rich display of a training run: a live progress bar with loss, accuracy, lr and samples/s, a line
per epoch, and a summary table. Implements trainer.Hooks; the library itself never prints.

When output is not a terminal (a log file, nohup, CI) a live bar shows nothing until the end, so a
plain line is printed instead: at tenths of an epoch, at most one every PIPED_TRAIN_EVERY_S seconds
(a short epoch would otherwise log a line a second), plus the epoch lines.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from fastflat.cli.consoles import plural
from fastflat.loop.steps import Hooks


def _num(value: float | None, spec: str) -> str:
    """A metric for display; None (a non-finite value, stored as null) shows as n/a."""
    return "n/a" if value is None else format(value, spec)


PIPED_TRAIN_EVERY_S = 10.0  # piped training output: a progress line at most this often


class RichHooks(Hooks):
    def __init__(self, console: Console, refreshes_per_epoch: int = 50):
        self.console = console
        self.refreshes_per_epoch = refreshes_per_epoch
        self.progress: Progress | None = None
        self.run_dir: str | None = None
        self.summary: dict[str, Any] | None = None  # the finished run's, from on_end

    def on_start(self, info: dict[str, Any]) -> None:
        self.run_dir = info["run_dir"]
        refreshes = self.refreshes_per_epoch if self.console.is_terminal else 10
        self.every = max(1, info["steps_per_epoch"] // refreshes)  # .item() syncs: not every step
        self.total = info["total_steps"]
        noisy = f", {info['noisy_labels']} noisy labels" if info["noisy_labels"] else ""
        self.console.print(f"[bold]run[/bold] {self.run_dir}  [dim]({info['params']:,} params on "
                           f"{info['device']}, {info['train_size']:,} training examples{noisy})[/dim]")
        self.progress = Progress(
            TextColumn("[bold blue]{task.fields[unit]} {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[stats]}"),
            console=self.console, transient=False,
        )
        if self.console.is_terminal:
            self.progress.start()
        self.unit = info.get("unit", "epoch")
        self.task = self.progress.add_task("train", total=info["total_steps"], completed=info["step"], unit=self.unit,
                                           epoch=1 + info["step"] // info["steps_per_epoch"], stats="")
        self.tick = time.perf_counter()
        self.tick_seen = 0
        self.last_line: float | None = None  # piped: when the last plain progress line was printed

    def on_step(self, step: int, metrics: dict[str, Any]) -> None:
        if step % self.every:
            return
        seen = metrics["seen"]
        now = time.perf_counter()
        fresh = seen if seen <= self.tick_seen else seen - self.tick_seen  # a new epoch restarts the count
        rate = fresh / max(now - self.tick, 1e-9)
        self.tick, self.tick_seen = now, seen
        loss = metrics["loss_sum"].item() / max(seen, 1)
        acc = 100.0 * metrics["correct"].item() / max(seen, 1)
        stats = f"loss {loss:.4f}  acc {acc:5.2f}%  lr {metrics['lr']:.4g}  {rate:,.0f} samples/s"
        self.progress.update(self.task, completed=step, epoch=metrics["epoch"] + 1, stats=stats)
        if not self.console.is_terminal:
            if self.last_line is not None and now - self.last_line < PIPED_TRAIN_EVERY_S:
                return
            self.last_line = now
            where = f"epoch {metrics['epoch'] + 1} " if self.unit == "epoch" else ""
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")  # a log read later needs the when
            self.console.print(f"{stamp}  {where}step {step}/{self.total}  {stats}", highlight=False, soft_wrap=True)

    def on_epoch(self, record: dict[str, Any]) -> None:
        self.progress.update(self.task, completed=record["step"])
        self.tick, self.tick_seen = time.perf_counter(), 0  # the next rate counts training only, not this evaluation
        if "test_acc" not in record:  # not an evaluation epoch (--eval-every): the bar says enough
            return
        val = f"val acc {record['val_acc']:5.2f}%  " if "val_acc" in record else ""
        val += f"EMA acc {_num(record['ema_test_acc'], '5.2f')}%  " if "ema_test_acc" in record else ""
        self.progress.console.print(
            f"{self.unit} {record['epoch']:>3}  train loss {record['train_loss']:.4f} acc {record['train_acc']:5.2f}%  "
            f"{val}[bold]test loss {_num(record['test_loss'], '.4f')} acc {_num(record['test_acc'], '5.2f')}%[/bold]  "
            f"{record['samples_per_s']:,.0f} samples/s")

    def on_event(self, message: str) -> None:
        self.console.print(f"[yellow]{message}[/yellow]", highlight=False)

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()

    def on_end(self, summary: dict[str, Any]) -> None:
        self.summary = summary
        self.stop()

    def print_summary(self, summary: dict[str, Any]) -> None:
        table = Table(title=f"{summary['method']} / {summary['model']} / {summary['dataset']}", show_header=False)
        table.add_column(style="dim")
        table.add_column(justify="right")
        rows = [("test accuracy", f"{_num(summary['test_acc'], '.2f')}%"), ("test loss", _num(summary["test_loss"], ".4f")),
                ("train loss", f"{summary['train_loss']:.4f}"), ("epochs / steps", f"{summary['epochs']} / {summary['steps']}"),
                ("training time", f"{summary['train_seconds']:.1f} s"), ("device", summary["provenance"]["device"]),
                ("run directory", summary["run_dir"])]
        if summary.get("delivered", "iterate") != "iterate":  # test accuracy above is that model's (SWA's average)
            rows[0] = (f"test accuracy ({summary['delivered'].upper()})", rows[0][1] + (
                f" ({plural(summary['swa_models_averaged'], 'model')})" if "swa_models_averaged" in summary else ""))
            rows.insert(1, ("last iterate test accuracy", f"{_num(summary['iterate_acc'], '.2f')}%"))
        if summary.get("ensemble"):
            e = summary["ensemble"]
            rows.insert(1, ("ensemble test accuracy", f"{e['ensemble']['acc']:.2f}% ({plural(len(e['members']), 'model')})"))
            rows.insert(2, ("best member", f"{e['best_member_acc']:.2f}%"))
        for key, value in rows:
            table.add_row(key, value)
        self.console.print(table)


PIPED_EVERY_S = 30.0  # piped output: a plain progress line at most this often (short work prints none)


@contextmanager
def progress_bar(console: Console, what: str):
    """Progress with ETA for long work; yields the (done, total) callback the landscape and ensembles take.

    On a terminal, a Rich bar shown from the first report on (so an input error is one line, with no
    empty bar before it). Piped, a timestamped plain line at most every PIPED_EVERY_S seconds."""
    bar = Progress(TextColumn(what), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=console)
    task, started, last_line = None, time.perf_counter(), [time.perf_counter()]

    def update(done: int, total: int) -> None:
        nonlocal task
        if not console.is_terminal:
            now = time.perf_counter()
            if now - last_line[0] >= PIPED_EVERY_S and 0 < done < total:
                rate = done / (now - started)
                console.print(f"{time.strftime('%Y-%m-%d %H:%M:%S')}  {what}: {done}/{total}, about "
                              f"{(total - done) / max(rate, 1e-9):.0f} s left", highlight=False, soft_wrap=True)
                last_line[0] = now
            return
        if task is None:
            bar.start()
            task = bar.add_task(what, total=total)
        bar.update(task, completed=done, total=total)

    try:
        yield update
    finally:
        if task is not None:
            bar.stop()


@contextmanager
def staged_progress(console: Console):
    """A progress bar with ETA per stage of long work: yields update(stage, done, total); a new stage
    closes the previous bar (left on screen, or its last plain line when piped) and opens its own."""
    current: dict[str, Any] = {"stage": None, "bar": None, "update": None}

    def close() -> None:
        if current["bar"] is not None:
            current["bar"].__exit__(None, None, None)
            current["bar"] = None

    def update(stage: str, done: int, total: int) -> None:
        if stage != current["stage"]:
            close()
            current["stage"], current["bar"] = stage, progress_bar(console, stage)
            current["update"] = current["bar"].__enter__()
        current["update"](done, total)

    try:
        yield update
    finally:
        close()


@contextmanager
def shown_progress(hooks: Hooks | None, progress: bool) -> Iterator[Hooks | None]:
    """fastflat.train()'s display: your hooks as given, none (progress=False), or what `fastflat train`
    shows, stopped however the run ends and followed by the summary table when it finishes."""
    if hooks is not None or not progress:
        yield hooks
        return
    from fastflat.cli.consoles import console

    shown = RichHooks(console)
    try:
        yield shown
    finally:
        shown.stop()
    if shown.summary is not None:
        shown.print_summary(shown.summary)
