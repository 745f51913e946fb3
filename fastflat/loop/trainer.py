"""The shared training loop: batches -> closure -> train_step -> schedule -> eval / log / checkpoint.

    trainer = build_trainer(cfg, RunDir.create("runs", "try"))     # fastflat.loop.assembly
    summary = trainer.run_epochs()                                  # or fastflat.train(cfg), which does both

Every method plugs in through fastflat.methods.Method; this file knows nothing of any method's math.
A step is atomic: signals are honoured between steps, a non-finite step never reaches the weights
or a checkpoint, and a checkpoint holds the epoch's running tallies and how long each log was, so a
resumed run writes the same metrics as one that never stopped. Progress reaches a caller through
`Hooks` (the CLI draws it with Rich); results land in a RunDir.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import replace
from typing import Any

import torch

from fastflat import data as datasets
from fastflat.config import TrainConfig, to_dict
from fastflat.errors import Interrupted, NonFiniteError, UserError, finite_state_or_raise
from fastflat.loop.faults import StopRequests
from fastflat.loop.services import Services
from fastflat.loop.steps import MAX_ROLLBACKS, MAX_SKIPS_IN_A_ROW, Position, epoch_generator, train_step
from fastflat.loss.closures import BatchClosure, SplitClosure
from fastflat.loss.evaluation import evaluate
from fastflat.methods import Closure, Method
from fastflat.methods.schedules import Schedule
from fastflat.ops import dist
from fastflat.runs.rundir import RunDir, load_checkpoint, load_weights, provenance


class Trainer:
    """Runs epochs from a Position over parts built elsewhere (loop.assembly.build_trainer)."""

    def __init__(self, cfg: TrainConfig, run: RunDir, services: Services, method: Method, schedule: Schedule):
        self.cfg, self.run, self.services, self.method, self.schedule = cfg, run, services, method, schedule
        self.hooks = services.hooks
        self.data, self.validation, self.holdouts = services.data, services.validation, services.holdouts
        self.model, self.flat, self.device, self.scaler = services.model, services.flat, services.device, services.scaler
        self.steps_per_epoch, self.total_steps = services.steps_per_epoch, services.total_steps
        # --log-every N, but at least 10 lines in a short run (a 30-step run would otherwise log none,
        # and its LR panel would be a straight line between epochs)
        planned = min(self.total_steps, cfg.max_steps) if cfg.max_steps else self.total_steps
        self.log_interval = max(1, min(cfg.log_every, planned // 10))
        self.full_batch = method.whole_set_steps  # an epoch is one step over the whole training set
        self.position = Position()
        self.saved_step: int | None = None  # the step the checkpoint on disk holds
        self._reset_tally()

    # -- checkpoints ---------------------------------------------------------------------------------
    def checkpoint(self) -> None:
        """Save the position; a model holding NaN or inf anywhere (a BatchNorm variance too) is never
        saved: NonFiniteError instead, so the checkpoint on disk stays the last finite one. The model
        saved is the one evaluation sees (schedule-free: its x; the method's state keeps y to train on)."""
        with self.method.evaluation_weights(self.flat):
            self._save()

    def _save(self) -> None:
        finite_state_or_raise(self.model.state_dict(), f"the model after step {self.position.step}")
        self._sync_tally()
        dist.broadcast_buffers_(self.model)  # torchrun: rank 0's BatchNorm statistics are the model's
        dist.assert_identical(self.flat.params, "weights")  # every step keeps them bitwise equal; checked here
        delivered = self.method.weights(self.flat)
        if delivered is not self.flat.params:  # an average (SWA, EMA, LAWA): one on every rank
            dist.assert_identical(delivered, "averaged weights")
        self.run.save_checkpoint({
            "config": to_dict(self.cfg),
            "model": self.model.state_dict(),
            "method": self.method.state_dict(),
            "position": dataclasses.asdict(self.position),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "logs": self.run.log_sizes(),  # resume cuts each log back to this: no line twice
        })
        self.saved_step = self.position.step

    def restore(self, state: dict[str, Any]) -> None:
        where = f"checkpoint {self.run.checkpoint_path}"
        load_weights(self.model, state["model"], where, self.cfg.model)  # copies into the flat views
        try:
            self.method.load_state_dict(state["method"])
            self.position = Position(**state["position"])
            torch.set_rng_state(state["rng_cpu"])
            if self.scaler is not None:
                self.scaler.load_state_dict(state["scaler"])
        except (KeyError, RuntimeError, TypeError, ValueError, IndexError) as e:
            raise UserError(f"{where} does not fit --method {self.cfg.method} ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else e}); it was not written by this run") from None
        if state.get("rng_cuda") is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        if "logs" in state:
            self.run.truncate_logs(state["logs"])
        else:  # checkpoints from before log sizes were kept
            self.run.truncate_metrics(self.position.step)
        self.flat.check_views()
        self.saved_step = self.services.step = self.position.step
        self._reset_tally()

    # -- the epoch's running tallies (part of the checkpointed position) ------------------------------
    def _reset_tally(self) -> None:
        pos = self.position
        self.loss_sum = torch.tensor(pos.loss_sum, dtype=torch.float32, device=self.device)
        self.correct = torch.tensor(pos.correct, dtype=torch.long, device=self.device)
        self.segment_start = time.time()

    def _sync_tally(self) -> None:
        """Copy the device tallies and the elapsed time into the Position (a host sync: checkpoints only)."""
        now = time.time()
        pos = self.position
        pos.loss_sum, pos.correct = self.loss_sum.item(), int(self.correct.item())
        pos.seconds += now - self.segment_start
        self.segment_start = now

    # -- the loop ------------------------------------------------------------------------------------
    def run_epochs(self) -> dict[str, Any]:
        cfg, pos = self.cfg, self.position
        self.hooks.on_start({"run_dir": str(self.run.path), "steps_per_epoch": self.steps_per_epoch,
                             "total_steps": self.total_steps, "step": pos.step,
                             "device": str(self.device), "params": self.flat.numel,
                             "train_size": len(self.data.train), "noisy_labels": self.data.noisy_labels,
                             "unit": "step" if self.full_batch else "epoch"})
        if self.data.skipped_images and pos.step == 0:  # --bad-images skip: said once, and kept with the run
            self.run.write_text("skipped-images.txt", "\n".join(self.data.skipped_images) + "\n")
            self.hooks.on_event(f"{len(self.data.skipped_images)} image(s) do not decode and were left out: "
                                f"see {self.run.path / 'skipped-images.txt'}")
        self.model.train()
        if cfg.tensorboard:
            self.run.open_tensorboard(pos.step or None)
        if self.saved_step is None:
            self.checkpoint()  # the starting point: an interrupt or a rollback always has one to return to
            if cfg.trajectory_every:
                self._save_trajectory_point(0)
        with StopRequests() as self.stop:
            while self.position.epoch < cfg.epochs and not self._steps_spent():
                try:
                    self._run_epoch()
                except NonFiniteError as e:
                    self._rollback_or_raise(e)
        return self._finish()

    def _run_epoch(self) -> None:
        cfg, pos = self.cfg, self.position
        self.skips_in_a_row = 0
        for index, closure in enumerate(self._closures(pos.epoch)):
            if index < pos.batch:
                continue  # resumed mid-epoch: replay the order, skip the work
            self._step(index, closure)
            if dist.any_rank(self.stop.requested, self.device):  # all ranks stop after the same step
                self.checkpoint()
                raise Interrupted(self.saved_step)
            if cfg.checkpoint_every and pos.step % cfg.checkpoint_every == 0:
                self.checkpoint()
            if self._steps_spent():
                break  # --max-steps: this epoch ends here, scored
        self._end_epoch()
        if dist.any_rank(self.stop.requested, self.device):
            raise Interrupted(self.saved_step)

    def _share(self) -> dict[str, int]:
        """torchrun: this rank's share of every batch, or all of it for methods that split work, not data (ES)."""
        if not self.method.splits_data:
            return {"rank": 0, "world_size": 1}
        return {"rank": dist.rank(), "world_size": dist.world_size()}

    def _steps_spent(self) -> bool:
        return bool(self.cfg.max_steps) and self.position.step >= self.cfg.max_steps

    def _closures(self, epoch: int):
        """The epoch's closures: one per batch; or, full batch, one over the whole split in chunks
        (augmented afresh every step; in a fixed order unless --shuffle-blocks)."""
        cfg = self.cfg
        generator = epoch_generator(cfg.seed, epoch)
        if self.full_batch:
            chunks = datasets.iterate_batches(self.data.train, cfg.fullbatch.chunk_size, dataset=self.data, train=True,
                                              generator=generator, shuffle=cfg.fullbatch.shuffle, **self._share())
            yield SplitClosure(self.model, self.flat, list(chunks), cfg.amp, self.scaler, cfg.label_smoothing)
            return
        for x, y in datasets.iterate_batches(self.data.train, cfg.batch_size * cfg.accumulate, dataset=self.data,
                                             train=True, generator=generator, drop_last=True, **self._share()):
            if cfg.accumulate == 1:
                yield BatchClosure(self.model, self.flat, x, y, cfg.amp, self.scaler, cfg.label_smoothing)
            else:  # K micro-batches, gradients summed into the flat buffer: one closure over all of them
                micro = len(y) // cfg.accumulate
                yield SplitClosure(self.model, self.flat, list(zip(x.split(micro), y.split(micro))), cfg.amp, self.scaler,
                                   cfg.label_smoothing)

    def _step(self, index: int, closure: Closure) -> None:
        pos = self.position
        lr = self.method.lr(pos.step, self.schedule(pos.step)) * pos.lr_scale
        skip = self.cfg.on_nonfinite == "skip"
        buffers = [b.clone() for b in self.model.buffers()] if skip else None  # BatchNorm statistics
        try:
            metrics = train_step(self.method, self.flat, closure, lr, pos.step)
        except NonFiniteError as e:
            if not skip or self.skips_in_a_row + 1 >= MAX_SKIPS_IN_A_ROW:
                raise
            for b, saved in zip(self.model.buffers(), buffers):
                b.copy_(saved)  # the weights never moved: base_update refused the step
            self.skips_in_a_row += 1
            pos.skipped += 1
            pos.step, pos.batch = pos.step + 1, index + 1
            self.services.step = pos.step
            self.hooks.on_event(f"skipped step {pos.step}: {e}")
            return
        self.skips_in_a_row = 0
        pos.overflows += bool(metrics.get("overflow"))  # fp16: skipped by the loss scaler, not an error
        if self.cfg.trajectory_every and (pos.step + 1) % self.cfg.trajectory_every == 0:
            self._save_trajectory_point(pos.step + 1)
        self.loss_sum += closure.loss_sum
        self.correct += closure.correct
        pos.seen += closure.batch_size
        pos.step, pos.batch = pos.step + 1, index + 1
        self.services.step = pos.step
        if self.cfg.log_every and pos.step % self.log_interval == 0:
            self._log_step(lr, metrics)
        self.hooks.on_step(pos.step, {"lr": lr, "seen": pos.seen, "epoch": pos.epoch,
                                      "loss_sum": self.loss_sum, "correct": self.correct, **metrics})

    def _log_step(self, lr: float, metrics: dict[str, Any]) -> None:
        """One steps.jsonl line: the epoch so far (running loss and accuracy), this step's loss, the lr."""
        pos = self.position
        seen = max(pos.seen, 1)
        record = {"step": pos.step, "epoch": pos.epoch + pos.batch / self.steps_per_epoch, "lr": lr,
                  "train_loss": float(self.loss_sum) / seen, "train_acc": 100.0 * int(self.correct) / seen}
        if isinstance(metrics.get("loss"), torch.Tensor):
            record["batch_loss"] = float(metrics["loss"])
        self.run.append_metrics(record, name="steps.jsonl")
        self.run.log_scalars(record, "step")

    def _save_trajectory_point(self, step: int) -> None:
        """The weights in parameter order, each parameter's elements in NCHW order (whatever the buffer's
        layout): the vector `fastflat landscape plane --trajectory` reads into its own contiguous space."""
        self.run.save_trajectory_point(step, torch.cat([p.reshape(-1) for p in self.flat.shaped(self.flat.params)]))

    def _end_epoch(self) -> None:
        cfg, pos = self.cfg, self.position
        self.method.end_epoch(self.flat, pos.epoch)
        self._sync_tally()
        scored = (pos.epoch + 1) % cfg.eval_every == 0 or pos.epoch + 1 == cfg.epochs or self._steps_spent()
        with self.method.evaluation_weights(self.flat) if scored else contextlib.nullcontext():
            # scores and the checkpoint see the weights the method delivers (schedule-free: x), switched once
            self._record_epoch(scored)

    def _record_epoch(self, scored: bool) -> None:
        cfg, pos = self.cfg, self.position
        test: dict[str, float] = {}
        if scored:
            test = {f"test_{k}": v for k, v in self.services.evaluate().items()}
            test.update(self.method.epoch_scores(self.flat))  # e.g. an EMA's own test scores
        if scored and self.validation is not None:  # for choosing epochs, members, k without the test set
            val = evaluate(self.model, self.validation, self.data, max(cfg.batch_size, 512), cfg.amp)
            test.update(val_loss=val["loss"], val_acc=val["acc"])
        last = max(pos.step - 1, 0)
        loss_sum, correct, seen = dist.all_reduce_sum([pos.loss_sum, pos.correct, pos.seen], self.device)  # all ranks
        record = {"epoch": pos.epoch + 1, "step": pos.step,
                  "lr": self.method.lr(last, self.schedule(last)) * pos.lr_scale,
                  "train_loss": loss_sum / max(seen, 1), "train_acc": 100.0 * correct / max(seen, 1), **test,
                  "epoch_seconds": pos.seconds, "samples_per_s": seen / max(pos.seconds, 1e-9)}
        if pos.skipped or pos.rollbacks:
            record.update(skipped_steps=pos.skipped, rollbacks=pos.rollbacks, lr_scale=pos.lr_scale)
        self.position = replace(pos, epoch=pos.epoch + 1, batch=0, loss_sum=0.0, correct=0, seen=0, seconds=0.0)
        self._reset_tally()
        self.run.append_metrics(record)
        self.run.log_scalars(record, "epoch")
        for log in ("metrics.jsonl", "steps.jsonl"):
            self.run.write_csv(log)
        if scored:  # a record past the last checkpoint is cut and written again on resume: still exact
            self.checkpoint()
        self.hooks.on_epoch(record)

    def _rollback_or_raise(self, error: NonFiniteError) -> None:
        """--on-nonfinite rollback: back to the last checkpoint with half the LR; else stop (exit 3)
        with the last finite checkpoint kept as it is."""
        pos = self.position
        where = f" at step {pos.step + 1} (epoch {pos.epoch + 1})"
        if self.cfg.on_nonfinite == "rollback" and pos.rollbacks < MAX_ROLLBACKS:
            scale, rollbacks = pos.lr_scale * 0.5, pos.rollbacks + 1
            self.restore(load_checkpoint(self.run.checkpoint_path))
            self.position.lr_scale, self.position.rollbacks = scale, rollbacks
            self.hooks.on_event(f"{error}{where}: back to step {self.saved_step}, learning rate x{scale:g}")
            return
        kept = f"the last finite checkpoint (step {self.saved_step}) is kept in {self.run.path}"
        hint = {"raise": "lower --lr, clip with --clip-grad, or pass --on-nonfinite skip|rollback",
                "skip": f"{MAX_SKIPS_IN_A_ROW} steps in a row were non-finite",
                "rollback": f"{MAX_ROLLBACKS} rollbacks did not help"}[self.cfg.on_nonfinite]
        raise NonFiniteError(f"{error}{where}; {kept}; {hint}") from None

    def _finish(self) -> dict[str, Any]:
        if self._steps_spent() and self.position.step < self.total_steps:
            self.hooks.on_event(f"stopped at --max-steps {self.cfg.max_steps} of the {self.total_steps} steps "
                                f"planned: a quick try, not what {self.cfg.method} delivers over its whole budget")
        extra = self.method.finish(self.flat)
        history = self.run.read_metrics()
        final = next((r for r in reversed(history) if "test_acc" in r), {})
        # test_acc is the model the method delivers (SWA: the average); the last iterate keeps its own name
        delivers = extra.pop("delivers", None)
        delivered = ({"test_acc": extra[f"{delivers}_acc"], "test_loss": extra[f"{delivers}_loss"], "delivered": delivers}
                     if delivers else {"delivered": "iterate"})
        summary = {
            "run_dir": str(self.run.path), "method": self.cfg.method, "model": self.cfg.model,
            "dataset": self.cfg.dataset, "epochs": self.cfg.epochs, "steps": self.position.step,
            "test_acc": final.get("test_acc"), "test_loss": final.get("test_loss"),
            "iterate_acc": final.get("test_acc"), "iterate_loss": final.get("test_loss"), **delivered,
            "train_loss": final.get("train_loss"), "train_seconds": sum(r["epoch_seconds"] for r in history),
            "params": self.flat.numel, "train_size": len(self.data.train), "test_examples": len(self.data.test),
            "evolution_split_size": sum(len(s) for s in self.holdouts.values()),
            "val_split_size": len(self.validation) if self.validation is not None else 0,
            "val_acc": final.get("val_acc"), "skipped_steps": self.position.skipped,
            **({"fp16_overflow_steps": self.position.overflows, "loss_scale": self.scaler.get_scale()}
               if self.scaler is not None else {}),
            "noisy_labels": self.data.noisy_labels, "data_source": self.data.source,
            "skipped_images": len(self.data.skipped_images),
            "planned_steps": self.total_steps, "ranks": dist.world_size(),
            **extra, "config": to_dict(self.cfg), "provenance": provenance(self.device),
        }
        self.run.write_summary(summary)
        self.run.close_tensorboard()
        try:
            if not self.run.writes:
                raise ImportError  # another rank draws nothing: rank 0 has the figure
            from fastflat.analysis.plots import plot_training_curves

            plot_training_curves(history, self.run.path / "curves.png", title=self.run.path.name,
                                 steps=self.run.read_metrics("steps.jsonl"))
        except ImportError:
            pass  # matplotlib missing: the numbers are in metrics.jsonl
        self.hooks.on_end(summary)
        return summary
