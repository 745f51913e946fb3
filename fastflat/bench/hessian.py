"""`fastflat bench hessian`: what one Hessian-vector product costs against one gradient, and how long the
top eigenvalue takes, for a model on N fixed training examples (eval mode, as `fastflat sharpness`).

    row = run_hessian("cnn", "fashion-mnist", examples=2048, device=torch.device("cpu"))

Both are timed in the same run over the same chunks of 256 examples; an HVP is one double backward,
so about 2x a gradient is what the method allows (more: the double-backward graph itself).
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F

from fastflat import data as datasets
from fastflat.bench.train import times_ms, median_iqr
from fastflat.flat import FlatParams
from fastflat.data.models import build_model
from fastflat.analysis.sharpness import lanczos, model_operator


def run_hessian(model_name: str, dataset: str, examples: int, device: torch.device, repeats: int = 5,
                tol: float = 1e-3) -> dict[str, Any]:
    data = datasets.load_dataset(dataset, device=device)
    head = datasets.Split(data.train.images[:examples], data.train.labels[:examples])
    chunks = list(datasets.iterate_batches(head, 256, dataset=data, train=False))
    torch.manual_seed(0)
    model = build_model(model_name, data.in_channels, data.num_classes, data.image_size).to(device).eval()
    flat = FlatParams(model)
    op = model_operator(flat, chunks)
    v = torch.randn(flat.numel, device=device)

    def gradient() -> None:
        flat.zero_grad_()
        for x, y in chunks:
            (F.cross_entropy(model(x), y) * (len(y) / examples)).backward()

    gradient(), op(v)  # warm-up: allocator, lazy init
    grad_ms, _ = median_iqr(times_ms(gradient, repeats, device))
    hvp_ms, hvp_iqr = median_iqr(times_ms(lambda: op(v), repeats, device))
    start = time.perf_counter()
    top = lanczos(op, flat.numel, k=1, tol=tol, device=device)
    top_s = time.perf_counter() - start
    return {"model": model_name, "dataset": dataset, "examples": examples, "params": flat.numel,
            "grad_ms": grad_ms, "hvp_ms": hvp_ms, "hvp_iqr_ms": hvp_iqr, "hvp_over_grad": hvp_ms / grad_ms,
            "top_eigenvalue": top["eigenvalues"][0], "lanczos_hvps": top["hvps"], "lanczos_tol": tol,
            "top_eigenvalue_s": top_s, "weights": "initialisation (seed 0)"}
