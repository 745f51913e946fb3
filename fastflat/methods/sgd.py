"""SGD with momentum, Nesterov and weight decay: the baseline every other method is measured against."""

from __future__ import annotations

from typing import Any

from fastflat.flat import FlatParams
from fastflat.methods.base import Closure, Method


class SGD(Method):
    name = "sgd"
    summary = "SGD with momentum, Nesterov and weight decay: the baseline."
    inner_ok = True

    def step(self, flat: FlatParams, closure: Closure, lr: float) -> dict[str, Any]:
        loss = closure(backward=True)
        return {"loss": loss, **self.base_update(flat.params, flat.grads, lr, {"loss": loss})}
