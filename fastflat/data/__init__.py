"""Data: the built-in sets and your own, held whole on the device as uint8 tensors, and the models.

    data = load_dataset("fashion-mnist", device="cuda")          # or "folder:PATH", or "synthetic"
    for x, y in iterate_batches(data.train, 128, dataset=data, train=True, generator=g): ...

`datasets` holds the splits, batching and the built-in sets; `folders` your own image trees and
tensors; `models` the built-in networks.
"""

from __future__ import annotations

import torch

from fastflat.data.datasets import (DATASETS, Dataset, Split, augmented_copies, hold_out_validation,
                                    iterate_batches, load_builtin, num_batches, random_subset, split_holdout)
from fastflat.data.folders import FOLDER_PREFIX, load_folder
from fastflat.errors import UserError


def load_dataset(name: str, data_dir: str | None = None, device: str | torch.device = "cpu", label_noise: float = 0.0,
                 seed: int = 0, download: bool = True, image_size: int = 32, bad_images: str = "fail") -> Dataset:
    """Load a dataset whole onto `device`, corrupting `label_noise` of its training labels (seeded).
    `folder:PATH` reads an ImageFolder tree, resized to `image_size`; `bad_images` fail | skip says what an
    image that does not decode does (see fastflat.data.folders)."""
    if not 0.0 <= label_noise < 1.0:  # also rejects NaN
        raise UserError(f"label noise must be in [0, 1), got {label_noise}; pass e.g. 0.2 for 20%")
    if name.startswith(FOLDER_PREFIX):
        return load_folder(name, device, label_noise, seed, image_size, bad_images)
    return load_builtin(name, data_dir, device, label_noise, seed, download)


__all__ = ["DATASETS", "Dataset", "Split", "augmented_copies", "hold_out_validation", "iterate_batches",
           "load_dataset", "num_batches", "random_subset", "split_holdout"]
