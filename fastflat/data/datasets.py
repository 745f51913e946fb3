"""Datasets held whole on the device as uint8 tensors, batched and augmented there in one op per batch.

`load_dataset("fashion-mnist", device="cuda")` reads the data once (local files first, then an
optional download); `iterate_batches(ds.train, 128, dataset=ds, train=True, generator=g)` then yields
normalised float batches with no DataLoader and no per-sample Python, in the style of cifar10-airbench.
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from fastflat.errors import UserError

DATASETS = ("fashion-mnist", "mnist", "cifar10", "cifar100", "synthetic")

DEFAULT_DATA_DIR = Path("~/.cache/fastflat/data").expanduser()
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
CROP_PADDING = 4  # pixels of reflect padding around each image before the random crop

# Dataset name -> torchvision class name, which is also the MNIST-likes' folder under the download root.
_TORCHVISION_CLASSES = {
    "fashion-mnist": "FashionMNIST", "mnist": "MNIST", "cifar10": "CIFAR10", "cifar100": "CIFAR100",
}
_IDX_STEMS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_SYNTHETIC_CLASSES, _SYNTHETIC_SIZE = 10, 16
_SYNTHETIC_TRAIN, _SYNTHETIC_TEST = 1024, 512
_SYNTHETIC_NOISE = 3.0  # per-pixel noise std, relative to the prototypes' unit std: hard enough that the
#                        small CNN overfits (2 epochs: ~69% test; 8 epochs: ~87%, train loss ~0.02)
_SYNTHETIC_SEED = 0  # the data's own seed: every run, whatever its --seed, sees the same images


@dataclass
class Split:
    images: Tensor  # (N, C, H, W) uint8, on the dataset's device
    labels: Tensor  # (N,) int64, same device

    def __len__(self) -> int:
        return self.labels.shape[0]


@dataclass
class Dataset:
    name: str
    train: Split
    test: Split
    num_classes: int
    in_channels: int
    image_size: int  # H (== W)
    mean: tuple[float, ...]  # per channel, in [0, 1] pixel units
    std: tuple[float, ...]
    augment: str  # "crop_flip", "flip" or "none" (--augment overrides the dataset's own)
    label_noise: float  # fraction of training labels asked to be corrupted
    noisy_labels: int  # how many training labels were actually changed
    source: str  # directory the data was read from, or "synthetic"
    skipped_images: tuple[str, ...] = ()  # folder:PATH with --bad-images skip: "path: why" of each file left out


def load_builtin(name: str, data_dir: str | None = None, device: str | torch.device = "cpu", label_noise: float = 0.0,
                 seed: int = 0, download: bool = True) -> Dataset:
    """Load one of DATASETS whole onto `device`, corrupting `label_noise` of its training labels (seeded)."""
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    if name == "synthetic":
        train, test, source = *_synthetic_splits(), "synthetic"
    elif name in ("fashion-mnist", "mnist"):
        train, test, source = _load_mnist_like(name, data_dir, download)
    else:
        train, test, source = _load_cifar(name, data_dir, download)

    num_classes = 100 if name == "cifar100" else 10
    noisy_train, noisy_count = with_label_noise(train, label_noise, num_classes, seed)
    mean, std = channel_mean_std(train.images)
    return Dataset(
        name=name,
        train=to_device(noisy_train, device),
        test=to_device(test, device),
        num_classes=num_classes,
        in_channels=train.images.shape[1],
        image_size=train.images.shape[2],
        mean=mean,
        std=std,
        augment="crop_flip" if name.startswith("cifar") else "none",
        label_noise=label_noise,
        noisy_labels=noisy_count,
        source=source,
    )


def split_holdout(split: Split, fraction: float, seed: int, salt: str = "holdout") -> tuple[Split, Split]:
    """Hold out a seeded random round(fraction * N) examples: returns (kept, held_out), each in original order.
    `salt` (the split's purpose) salts the seed, so a validation split and a method's holdout differ."""
    if not 0.0 <= fraction < 1.0:
        raise UserError(f"hold-out fraction must be in [0, 1), got {fraction}")
    held_count = round(fraction * len(split))
    order = torch.randperm(len(split), generator=_seeded_generator(seed, salt))
    held = order[:held_count].sort().values.to(split.labels.device)
    kept = order[held_count:].sort().values.to(split.labels.device)
    return _subset(split, kept), _subset(split, held)


def hold_out_validation(data: Dataset, fraction: float, seed: int) -> tuple[Dataset, Split | None]:
    """(data without the validation examples, the validation split): what a run trained with
    --val-split F never saw, rebuilt the same way by anything that re-reads the run (e.g. `fastflat
    ensemble` choosing k). fraction 0 = no validation split."""
    if fraction == 0:
        return data, None
    kept, validation = split_holdout(data.train, fraction, seed, salt="validation")
    return replace(data, train=kept), validation


def random_subset(split: Split, count: int, seed: int) -> Split:
    """A seeded random `count` examples of `split` (all of it when count is 0 or too large), in order."""
    if count == 0 or count >= len(split):
        return split
    chosen = torch.randperm(len(split), generator=_seeded_generator(seed, "subset"))[:count].sort().values
    return _subset(split, chosen.to(split.labels.device))


def augmented_copies(split: Split, copies: int, seed: int) -> Split:
    """The split enlarged `copies`-fold once, each copy randomly cropped and flipped (uint8, seeded): a
    fixed dataset with augmentation, as full-batch training compares against fresh augmentation."""
    generator = _seeded_generator(seed, "fixed-augment")
    images = [_random_crop_flip(split.images, generator) for _ in range(copies)]
    return Split(torch.cat(images), split.labels.repeat(copies))


def num_batches(n: int, batch_size: int, drop_last: bool) -> int:
    return n // batch_size if drop_last else math.ceil(n / batch_size)


def iterate_batches(
    split: Split,
    batch_size: int,
    *,
    dataset: Dataset,
    train: bool,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
    rank: int = 0,
    world_size: int = 1,
    shuffle: bool = True,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield (x, y): x (B, C, H, W) float32 normalised, y (B,) int64; shuffled and augmented if `train`.

    All randomness is drawn from the CPU `generator` and then moved, so the order and the
    augmentations are identical on every device. shuffle=False keeps the split's order (still
    augmented when `train`: full-batch training without reshuffling). With world_size > 1 each rank gets its
    batch_size / world_size rows of every global batch (rank r: the r-th slice), augmented exactly as
    the single-process batch would be: the ranks together see the same examples, step by step.
    """
    if batch_size % world_size:
        raise UserError(f"batch size {batch_size} does not split evenly over {world_size} processes")
    device = split.images.device
    scale, shift = _normalisation(dataset, device, split.images.dim())
    order = torch.randperm(len(split), generator=generator).to(device) if train and shuffle else None
    share = batch_size // world_size
    for batch in range(num_batches(len(split), batch_size, drop_last)):
        rows = slice(batch * batch_size, (batch + 1) * batch_size)
        index = order[rows] if order is not None else rows
        images, labels = split.images[index], split.labels[index]
        if train and dataset.augment in ("crop_flip", "flip"):  # drawn for the global batch: same on every rank
            images = _random_crop_flip(images, generator, crop=dataset.augment == "crop_flip")
        mine = slice(rank * share, (rank + 1) * share) if world_size > 1 else slice(None)
        yield images[mine].float() * scale + shift, labels[mine]


def _normalisation(dataset: Dataset, device: torch.device, ndim: int = 4) -> tuple[Tensor, Tensor]:
    """(scale, shift), each (1, C, 1, 1) for images (1, F) for (N, F) inputs, with
    x = pixel * scale + shift == (pixel/255 - mean) / std."""
    shape = (1, -1, *([1] * (ndim - 2))) if ndim >= 2 else (-1,)
    mean = torch.tensor(dataset.mean, device=device).view(shape)
    std = torch.tensor(dataset.std, device=device).view(shape)
    return 1.0 / (255.0 * std), -mean / std


def _random_crop_flip(images: Tensor, generator: torch.Generator | None, crop: bool = True) -> Tensor:
    """Random crop of each image padded by CROP_PADDING (reflect), then a random horizontal flip (crop=False:
    the flip alone).

    Done as one gather: output pixel (i, j) reads source pixel (reflect(i + dy), reflect(j' + dx)),
    where j' = W - 1 - j for flipped images, so no padded copy is ever made.
    """
    batch, channels, height, width = images.shape
    device = images.device
    padding = CROP_PADDING if crop else 0
    offsets = torch.randint(-padding, padding + 1, (2, batch, 1), generator=generator).to(device)
    flipped = torch.randint(0, 2, (batch, 1), generator=generator).bool().to(device)
    row_steps = torch.arange(height, device=device)
    col_steps = torch.arange(width, device=device)
    rows = _reflect(offsets[0] + row_steps, height)  # (B, H)
    cols = _reflect(offsets[1] + torch.where(flipped, width - 1 - col_steps, col_steps), width)  # (B, W)
    source = (rows[:, :, None] * width + cols[:, None, :]).view(batch, 1, height * width)  # (B, 1, H*W)
    pixels = images.flatten(2).gather(2, source.expand(batch, channels, height * width))
    return pixels.view(batch, channels, height, width)


def _reflect(index: Tensor, size: int) -> Tensor:
    """Mirror indices in [-(size-1), 2*(size-1)] back into [0, size) without repeating the edge."""
    return (size - 1) - ((size - 1) - index.abs()).abs()


def with_label_noise(split: Split, fraction: float, num_classes: int, seed: int) -> tuple[Split, int]:
    """Give round(fraction * N) seeded-random examples a uniformly random *different* class."""
    count = round(fraction * len(split))
    generator = _seeded_generator(seed, "label-noise")
    chosen = torch.randperm(len(split), generator=generator)[:count]
    # Adding 1..C-1 modulo C picks each other class with equal probability.
    offsets = torch.randint(1, num_classes, (count,), generator=generator)
    labels = split.labels.clone()
    labels[chosen] = (labels[chosen] + offsets) % num_classes
    return Split(split.images, labels), count


def channel_mean_std(images: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean/std in [0, 1] units, from a 256-bin histogram (no float copy of the data)."""
    pixel_values = torch.arange(256, dtype=torch.float64) / 255.0
    means, stds = [], []
    for channel in range(images.shape[1]):
        counts = torch.bincount(images[:, channel].flatten(), minlength=256).double()
        mean = (counts * pixel_values).sum() / counts.sum()
        variance = (counts * (pixel_values - mean) ** 2).sum() / counts.sum()
        means.append(mean.item())
        stds.append(variance.sqrt().item())
    return tuple(means), tuple(stds)


def _synthetic_splits() -> tuple[Split, Split]:
    """10 classes of 1x16x16 images: a smooth random prototype per class plus strong white noise.
    Fixed by its own seed, so runs of different --seed (an ensemble of them) share one dataset."""
    generator = _seeded_generator(_SYNTHETIC_SEED, "synthetic")
    coarse = torch.randn(_SYNTHETIC_CLASSES, 1, 4, 4, generator=generator)
    prototypes = F.interpolate(coarse, size=_SYNTHETIC_SIZE, mode="bilinear", align_corners=False)

    def sample(count: int) -> Split:
        labels = torch.randint(0, _SYNTHETIC_CLASSES, (count,), generator=generator)
        noise = torch.randn(count, 1, _SYNTHETIC_SIZE, _SYNTHETIC_SIZE, generator=generator)
        pixels = 128 + 40 * (prototypes[labels] + _SYNTHETIC_NOISE * noise)  # ~N(128, 57^2)
        return Split(pixels.round().clamp(0, 255).to(torch.uint8), labels)

    return sample(_SYNTHETIC_TRAIN), sample(_SYNTHETIC_TEST)


def _load_mnist_like(name: str, data_dir: str | None, download: bool) -> tuple[Split, Split, str]:
    """Read IDX files from the first folder holding all four; else download them with torchvision."""
    root = Path(data_dir).expanduser() if data_dir else DEFAULT_DATA_DIR
    raw_dir = root / _TORCHVISION_CLASSES[name] / "raw"  # where torchvision puts them
    searched = [root, raw_dir]
    if name == "fashion-mnist":
        searched.insert(0 if data_dir is None else 2, DEBIAN_FASHION_MNIST_DIR)
    for directory in searched:
        if all(_find_idx_file(directory, stem) for stems in _IDX_STEMS.values() for stem in stems):
            return _read_idx_split(directory, "train"), _read_idx_split(directory, "test"), str(directory)

    failure = "download is off" if not download else _download_torchvision(name, root)
    if failure is None:
        return _read_idx_split(raw_dir, "train"), _read_idx_split(raw_dir, "test"), str(raw_dir)
    fix = "pass --data-dir DIR with the four IDX files (train/t10k images/labels, .gz or not)"
    if name == "fashion-mnist":
        fix += ", or `apt-get install dataset-fashion-mnist`"
    places = ", ".join(str(path) for path in searched)
    raise UserError(f"dataset {name!r} not found in {places} and {failure}; {fix}")


def _load_cifar(name: str, data_dir: str | None, download: bool) -> tuple[Split, Split, str]:
    root = Path(data_dir).expanduser() if data_dir else DEFAULT_DATA_DIR
    try:
        train = _cifar_split(name, root, train=True, download=download)
        test = _cifar_split(name, root, train=False, download=download)
    except (RuntimeError, OSError) as error:  # missing files or no network
        reason = "download is off" if not download else f"the download failed ({_cause(error)})"
        raise UserError(
            f"dataset {name!r} not found in {root} and {reason}; pass --data-dir DIR holding "
            f"torchvision's cifar-*-batches-py folder, or run once with network access to download it"
        ) from error
    return train, test, str(root)


def _cifar_split(name: str, root: Path, *, train: bool, download: bool) -> Split:
    raw = _torchvision_dataset(name, root, train=train, download=download)
    images = torch.from_numpy(raw.data).permute(0, 3, 1, 2).contiguous()  # (N, 32, 32, 3) -> (N, 3, 32, 32)
    return Split(images, torch.tensor(raw.targets, dtype=torch.int64))


def _download_torchvision(name: str, root: Path) -> str | None:
    """Download an MNIST-like dataset (both parts) into root/<Class>/raw; returns why it failed, or None."""
    try:
        _torchvision_dataset(name, root, train=True, download=True)
    except (RuntimeError, OSError) as error:
        return f"the download failed ({_cause(error)})"
    return None


def _torchvision_dataset(name: str, root: Path, *, train: bool, download: bool):
    import torchvision  # deferred: slow to import, and only needed for CIFAR or a download

    return getattr(torchvision.datasets, _TORCHVISION_CLASSES[name])(str(root), train=train, download=download)


def _find_idx_file(directory: Path, stem: str) -> Path | None:
    for candidate in (directory / f"{stem}.gz", directory / stem):
        if candidate.is_file():
            return candidate
    return None


def _read_idx_split(directory: Path, part: str) -> Split:
    image_stem, label_stem = _IDX_STEMS[part]
    images = _read_idx(_find_idx_file(directory, image_stem))  # (N, H, W) uint8
    labels = _read_idx(_find_idx_file(directory, label_stem))  # (N,) uint8
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        shapes = f"images {tuple(images.shape)}, labels {tuple(labels.shape)}"
        raise UserError(f"IDX files in {directory} do not match ({shapes}); re-download them")
    return Split(images.unsqueeze(1), labels.long())


def _read_idx(path: Path) -> Tensor:
    """Parse a (gzipped or plain) uint8 IDX file: header 0, 0, 0x08, ndim, then ndim big-endian uint32 dims."""
    try:
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:  # not gzip, or a gzip stream cut short
        raise UserError(f"{path} is not a readable gzip file ({e}); re-download it or point --data-dir elsewhere") from None
    if len(data) < 4 or data[:3] != b"\x00\x00\x08":
        raise UserError(f"{path} is not a uint8 IDX file; re-download it or point --data-dir elsewhere")
    ndim = data[3]
    header_size = 4 + 4 * ndim
    if len(data) < header_size:
        raise UserError(f"{path} is truncated inside its IDX header; re-download it or point --data-dir elsewhere")
    shape = struct.unpack(f">{ndim}I", data[4:header_size])
    if len(data) != header_size + math.prod(shape):
        raise UserError(f"{path} is truncated; re-download it or point --data-dir elsewhere")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8, offset=header_size).reshape(shape)


def _seeded_generator(seed: int, purpose: str) -> torch.Generator:
    """A CPU generator per (seed, purpose), so e.g. label noise and hold-out draws are independent.

    The CPU generator keeps only the low 32 bits of a seed, so the purpose is XORed into those bits
    (distinct seeds below 2**32 still give distinct generators for each purpose).
    """
    return torch.Generator().manual_seed((seed ^ zlib.crc32(purpose.encode())) & 0xFFFFFFFF)


def _subset(split: Split, index: Tensor) -> Split:
    return Split(split.images[index], split.labels[index])


def to_device(split: Split, device: str | torch.device) -> Split:
    return Split(split.images.to(device), split.labels.to(device))


def _cause(error: Exception) -> str:
    """The last line of an error message: torchvision puts the underlying cause (e.g. a URL error) there."""
    return str(error).strip().split("\n")[-1] or type(error).__name__
