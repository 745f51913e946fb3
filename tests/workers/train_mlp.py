"""Run by tests/test_distributed.py, alone or under torchrun: fastflat.train on an MLP (no BatchNorm, so
a 2-rank step equals a 1-process step to float tolerance) over fixed tabular data.

    python tests/workers/train_mlp.py OUT NAME METHOD EPOCHS [EXTEND_TO_EPOCHS | resume | sigint@STEP | sigkill@STEP]
"""

import os
import signal
import sys

import torch
from torch import nn

import fastflat
from fastflat.loop.steps import Hooks
from fastflat.loop import resume


def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(640, 12, generator=g)
    y = (x @ torch.randn(12, 4, generator=g)).argmax(1)
    return (x[:512], y[:512]), (x[512:], y[512:])


def model():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 4))


SAM_FAMILY = {  # --method sam settings of each variant and schedule (tests/test_sam_composition.py)
    "gsam": {"variant": "gsam"}, "fsam": {"variant": "fsam"}, "wsam": {"variant": "wsam"},
    "msam": {"variant": "msam"}, "esam": {"variant": "esam"}, "looksam": {"variant": "looksam", "looksam_k": 2},
    "sam-on": {"only": "norm"}, "every": {"every": 2}, "prob": {"prob": 0.5}, "from": {"start": 0.5},
}


class SignalAt(Hooks):
    """After optimizer step `step`: sigint, Ctrl-C in a terminal (SIGINT from rank 0 to the whole group:
    torchrun and every rank); sigkill, rank 1 dies (OOM killer, a lost node: no handler runs)."""

    def __init__(self, kind: str, step: str):
        self.kind, self.step = kind, int(step)

    def on_step(self, step, metrics):
        if step != self.step:
            return
        if self.kind == "sigint" and os.environ.get("RANK", "0") == "0":
            os.killpg(os.getpgid(0), signal.SIGINT)
        if self.kind == "sigkill" and os.environ.get("RANK") == "1":
            os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    out, name, method, epochs = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    extra = sys.argv[5] if len(sys.argv) > 5 else ""
    hooks = None
    if extra.startswith(("sigint@", "sigkill@")):
        hooks = SignalAt(*extra.split("@"))
    if extra == "resume":
        resume(f"{out}/{name}", model=model(), data=data())
    elif extra.isdigit():  # extend a finished run (saved on any number of ranks) to more epochs
        resume(f"{out}/{name}", model=model(), data=data(), epochs=int(extra))
    elif method == "sam-family":  # every SAM variant and ascent schedule in one launch, a run each (NAME-VARIANT)
        for variant, sam in SAM_FAMILY.items():
            settings = {"method": "sam", "sam": sam, "epochs": epochs, "batch_size": 64, "schedule": "constant",
                        "lr": 0.1, "device": "cpu", "out": out, "name": f"{name}-{variant}", "log_every": 0}
            torch.manual_seed(1)
            with_norm = nn.Sequential(nn.Linear(12, 32), nn.LayerNorm(32), nn.Tanh(), nn.Linear(32, 4))  # SAM-ON's
            fastflat.train(settings, model=with_norm, data=data())
    else:
        settings = {"method": method, "epochs": epochs, "batch_size": 64, "schedule": "constant", "lr": 0.1,
                    "device": "cpu", "out": out, "name": name, "log_every": 0}
        if method.endswith("-acc2"):  # two accumulated batches of 32: the same 64 examples per step
            settings.update({"method": method[: -len("-acc2")], "accumulate": 2, "batch_size": 32})
        if method == "sam-sync":  # the ascent from the all-reduced gradient: one process's plain SAM
            settings.update({"method": "sam", "sam": {"sync_ascent": True}})
        if method == "sam-m32":  # one process, one ascent per 32 examples: what 2 ranks of 32 each do
            settings.update({"method": "sam", "sam": {"m": 32}})
        if method.startswith("fullbatch"):  # one step per epoch over all 512 examples, in chunks of 128
            gradreg = method[len("fullbatch-"):] or "off"  # fullbatch-finite | fullbatch-exact: the penalty
            settings.update({"method": "fullbatch", "fullbatch": {"chunk_size": 128, "gradreg": gradreg}})
        if method.endswith("-fp16"):  # fp16 with a loss scale, on the CPU (the CLI refuses it there; fp16 matmuls are fast)
            from fastflat.loss import evaluation

            evaluation.FP16_DEVICE_TYPES = ("cpu",)
            settings.update({"method": method[: -len("-fp16")], "amp": "fp16"})
            if settings["method"] == "sam-m32":
                settings.update({"method": "sam", "sam": {"m": 32}})
        if method == "curve":  # a Bezier bend between two runs the test trained before: end-a and end-b
            settings.update({"curve": {"start": f"{out}/end-a", "end": f"{out}/end-b"}})
        if method == "swa":
            settings.update({"swa": {"start": 1, "lr": 0.05, "cycle": 2}})
            settings.pop("schedule")
        if method == "sf":  # a schedule-free optimizer (constant schedule, as above)
            settings.update({"method": "sgd", "optimizer": "schedulefree-sgd"})
        if method in ("ema", "lawa"):  # an average over SGD
            settings.update({"method": "sgd", method: {"decay": 0.9} if method == "ema" else {"k": 3, "every": 2}})
        if method == "fge":
            settings.update({"fge": {"pretrain": 0.5, "cycle_epochs": 0.25}})
            settings.pop("schedule")
        fastflat.train(settings, model=model(), data=data(), hooks=hooks)
    from fastflat.ops import dist

    dist.finish()
