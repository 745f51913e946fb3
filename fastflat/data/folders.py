"""Your own data as a fastflat Dataset: an ImageFolder tree (`--dataset folder:PATH`), or any pair of
torch datasets, DataLoaders or (inputs, labels) tensors passed to `fastflat.train(..., data=(train, test))`.

Both end device-resident like the built-in sets (the trainer's batches are then index gathers, no
loader in the loop). A folder tree is decoded once by torchvision with worker processes, resized to
`image_size` and kept as uint8 (N, C, S, S); a set too large for that is refused with its size.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fastflat.data.datasets import Dataset, Split, channel_mean_std, to_device, with_label_noise
from fastflat.errors import UserError

FOLDER_PREFIX = "folder:"
RGB = 3  # channels of every ImageFolder image: its default loader converts to RGB
MAX_RESIDENT_BYTES = 8 * 2**30  # uint8 pixels of both splits; beyond this a streaming loader would be needed
TEST_FOLDERS = ("val", "test")


def load_folder(spec: str, device: str | torch.device, label_noise: float, seed: int, image_size: int = 32,
                bad_images: str = "fail") -> Dataset:
    """`folder:PATH`: PATH/train/<class>/* and PATH/val/<class>/* (or test/), any image format PIL reads.
    An image that does not decode (not an image, empty, cut short) is named with the others and the load
    refused (bad_images="fail"), or left out with a warning (bad_images="skip", the paths kept in
    Dataset.skipped_images for the run directory)."""
    from torchvision import datasets as tv_datasets
    from torchvision import transforms

    root = Path(spec[len(FOLDER_PREFIX):]).expanduser()
    test_dir = next((root / name for name in TEST_FOLDERS if (root / name).is_dir()), None)
    if not (root / "train").is_dir() or test_dir is None:
        raise UserError(f"--dataset {spec}: expected {root}/train/<class>/... and {root}/val/ (or test/) "
                        "class folders of images")
    transform = transforms.Compose([transforms.Resize((image_size, image_size)), transforms.PILToTensor()])
    try:
        train_set = tv_datasets.ImageFolder(str(root / "train"), transform=transform)
        test_set = tv_datasets.ImageFolder(str(test_dir), transform=transform)
    except (FileNotFoundError, OSError) as e:
        raise UserError(f"--dataset {spec}: {e}") from None
    if train_set.classes != test_set.classes:
        raise UserError(f"--dataset {spec}: train/ has classes {train_set.classes}, {test_dir.name}/ has "
                        f"{test_set.classes}: both need the same class folders")
    if len(train_set.classes) < 2:
        raise UserError(f"--dataset {spec}: train/ has one class folder ({train_set.classes[0]}); a classifier needs "
                        "at least two")
    size = (len(train_set) + len(test_set)) * RGB * image_size * image_size  # ImageFolder's loader converts to RGB
    if size > MAX_RESIDENT_BYTES:
        raise UserError(f"--dataset {spec}: {size / 2**30:.1f} GiB of pixels at {image_size}x{image_size} is more "
                        f"than fastflat keeps in memory ({MAX_RESIDENT_BYTES / 2**30:.0f} GiB); pass a smaller size")
    (train, bad_train), (test, bad_test) = _decode(train_set, image_size), _decode(test_set, image_size)
    bad = bad_train + bad_test
    if bad and bad_images != "skip":
        listed = "; ".join(f"{path} ({why})" for path, why in bad[:3]) + (f"; and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise UserError(f"--dataset {spec}: {len(bad)} image(s) do not decode: {listed}; remove them, or pass "
                        "--bad-images skip to train without them")
    if len(train) == 0 or len(test) == 0:
        raise UserError(f"--dataset {spec}: no image of {'train' if len(train) == 0 else test_dir.name}/ decodes")
    data = _dataset(f"{FOLDER_PREFIX}{root}", train, test, len(train_set.classes), device, label_noise, seed,
                    str(root), pixels=True)
    return replace(data, skipped_images=tuple(f"{path}: {why}" for path, why in bad))


class _Decoded(torch.utils.data.Dataset):
    """An ImageFolder's items as (uint8 image, label, decoded?): a file that does not decode gives a black
    placeholder and False, so one bad file never stops the worker processes."""

    def __init__(self, folder: Any, image_size: int):
        self.folder, self.blank = folder, torch.zeros(RGB, image_size, image_size, dtype=torch.uint8)

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, index: int) -> tuple[Tensor, int, str]:
        path, label = self.folder.samples[index]
        try:
            return self.folder[index][0], label, ""
        except Exception as e:  # PIL raises UnidentifiedImageError, OSError (truncated), SyntaxError, ...
            return self.blank, label, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:120]


def _decode(folder: Any, image_size: int) -> tuple[Split, list[tuple[str, str]]]:
    """Every image of an ImageFolder, decoded by worker processes, as one uint8 (N, 3, S, S) tensor without
    the files that do not decode, and those files' (path, why)."""
    workers = min(4, os.cpu_count() or 1)
    loader = torch.utils.data.DataLoader(_Decoded(folder, image_size), batch_size=256,
                                         num_workers=workers if len(folder) > 256 else 0)
    images, labels, whys = [], [], []
    for batch_images, batch_labels, batch_whys in loader:
        images.append(batch_images)
        labels.append(batch_labels)
        whys.extend(batch_whys)
    ok = torch.tensor([not why for why in whys], dtype=torch.bool)
    bad = [(folder.samples[i][0], why) for i, why in enumerate(whys) if why]
    return Split(torch.cat(images)[ok].contiguous(), torch.cat(labels).long()[ok]), bad


def from_user_data(data: Any, device: str | torch.device, label_noise: float, seed: int) -> Dataset:
    """`data=(train, test)`: each a torch Dataset yielding (x, y), a DataLoader, or an (inputs, labels) pair
    of tensors. Float inputs are used as given (normalise them yourself); uint8 images are scaled like
    the built-in sets."""
    if not isinstance(data, (tuple, list)) or len(data) != 2:
        raise UserError("data= takes a pair (train, test) of datasets, DataLoaders or (inputs, labels) tensors")
    train, test = (_as_split(part, name) for part, name in zip(data, ("train", "test")))
    if train.images.shape[1:] != test.images.shape[1:]:
        raise UserError(f"train inputs are {tuple(train.images.shape[1:])}, test inputs {tuple(test.images.shape[1:])}")
    classes = int(max(train.labels.max(), test.labels.max())) + 1
    pixels = train.images.dtype == torch.uint8
    return _dataset("custom", train, test, classes, device, label_noise, seed, "python", pixels=pixels)


def _as_split(part: Any, name: str) -> Split:
    if isinstance(part, (tuple, list)) and len(part) == 2 and all(isinstance(t, Tensor) for t in part):
        inputs, labels = part
    else:
        if isinstance(part, torch.utils.data.DataLoader):
            batches = list(part)
        elif isinstance(part, torch.utils.data.Dataset):
            batches = list(torch.utils.data.DataLoader(part, batch_size=1024))
        else:
            raise UserError(f"{name} data is a {type(part).__name__}: pass a torch Dataset, a DataLoader or "
                            "(inputs, labels) tensors")
        if not batches or not all(isinstance(b, (tuple, list)) and len(b) == 2 for b in batches):
            raise UserError(f"{name} data must yield (input, label) pairs")
        inputs, labels = torch.cat([b[0] for b in batches]), torch.cat([torch.as_tensor(b[1]) for b in batches])
    if len(inputs) != len(labels) or len(labels) == 0:
        raise UserError(f"{name} data has {len(inputs)} inputs and {len(labels)} labels")
    if labels.dtype.is_floating_point or labels.min() < 0:
        raise UserError(f"{name} labels must be class indices 0..C-1 (integers)")
    return Split(inputs.detach().cpu().contiguous(), labels.detach().cpu().long())


def _dataset(name: str, train: Split, test: Split, classes: int, device, label_noise: float, seed: int,
             source: str, pixels: bool) -> Dataset:
    noisy, count = with_label_noise(train, label_noise, classes, seed)
    channels = train.images.shape[1] if train.images.dim() >= 2 else 1
    if pixels:
        mean, std = channel_mean_std(train.images)
    else:  # float inputs pass through: x = input * 1 + 0 (see datasets._normalisation)
        mean, std = (0.0,) * channels, (1.0 / 255.0,) * channels
    return Dataset(name=name, train=to_device(noisy, device), test=to_device(test, device), num_classes=classes,
                   in_channels=channels, image_size=train.images.shape[2] if train.images.dim() == 4 else 0,
                   mean=mean, std=std, augment="none", label_noise=label_noise, noisy_labels=count, source=source)
