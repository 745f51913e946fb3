"""Training methods, by the name the CLI and configs use."""

from fastflat.methods.base import Closure, Method
from fastflat.methods.sam import SAM
from fastflat.methods.sgd import SGD

METHODS: dict[str, type[Method]] = {"sgd": SGD, "sam": SAM}

__all__ = ["METHODS", "Closure", "Method"]
