"""Specification of fastflat.data: loading (real Fashion-MNIST, synthetic, missing data), label noise,
hold-out splits, and on-device batching with shuffling and crop+flip augmentation."""

import dataclasses
import gzip

import pytest
import torch
import torch.nn.functional as F

from fastflat.data import datasets as builtin
from fastflat.data.datasets import CROP_PADDING, DEBIAN_FASHION_MNIST_DIR
from fastflat.data import (
    DATASETS,
    Split,
    iterate_batches,
    load_dataset,
    num_batches,
    hold_out_validation,
    split_holdout,
)
from fastflat.errors import UserError

needs_fashion_mnist = pytest.mark.skipif(
    not DEBIAN_FASHION_MNIST_DIR.is_dir(), reason="needs `apt-get install dataset-fashion-mnist`"
)


@pytest.fixture(scope="module")
def fashion():
    return load_dataset("fashion-mnist", download=False)


@pytest.fixture(scope="module")
def synthetic():
    return load_dataset("synthetic", seed=0)


def indexed_dataset(synthetic, count=100, augment="none"):
    """Synthetic data whose train label i marks example i, to trace examples through batching."""
    split = Split(synthetic.train.images[:count], torch.arange(count))
    return dataclasses.replace(synthetic, train=split, augment=augment)


def labels_of_epoch(dataset, batch_size, seed, drop_last=False):
    generator = torch.Generator().manual_seed(seed)
    batches = iterate_batches(dataset.train, batch_size, dataset=dataset, train=True, generator=generator,
                              drop_last=drop_last)
    return torch.cat([labels for _, labels in batches])


def normalised(images, dataset):
    mean = torch.tensor(dataset.mean).view(1, -1, 1, 1)
    std = torch.tensor(dataset.std).view(1, -1, 1, 1)
    return (images.float() / 255 - mean) / std


# --- loading -------------------------------------------------------------------------------------


@needs_fashion_mnist
def test_fashion_mnist_loads_from_the_debian_path_with_expected_shapes(fashion):
    assert fashion.train.images.shape == (60000, 1, 28, 28) and fashion.train.images.dtype == torch.uint8
    assert fashion.train.labels.shape == (60000,) and fashion.train.labels.dtype == torch.int64
    assert fashion.test.images.shape == (10000, 1, 28, 28) and fashion.test.labels.shape == (10000,)
    assert (fashion.num_classes, fashion.in_channels, fashion.image_size) == (10, 1, 28)
    assert fashion.source == str(DEBIAN_FASHION_MNIST_DIR)
    assert fashion.augment == "none" and fashion.noisy_labels == 0
    assert set(fashion.train.labels.tolist()) == set(range(10))


@needs_fashion_mnist
def test_fashion_mnist_mean_and_std_are_the_standard_values(fashion):
    assert fashion.mean == pytest.approx((0.2860,), abs=1e-3)
    assert fashion.std == pytest.approx((0.3530,), abs=1e-3)


@needs_fashion_mnist
def test_data_dir_with_ungzipped_torchvision_layout_is_read_first(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for archive in DEBIAN_FASHION_MNIST_DIR.glob("*-ubyte.gz"):
        (raw / archive.stem).write_bytes(gzip.decompress(archive.read_bytes()))
    dataset = load_dataset("fashion-mnist", data_dir=str(tmp_path), download=False)
    assert dataset.source == str(raw)
    assert dataset.train.images.shape == (60000, 1, 28, 28)


@pytest.mark.parametrize("name", ["mnist", "cifar10", "cifar100"])
def test_missing_dataset_without_download_raises_user_error_naming_it(tmp_path, name):
    with pytest.raises(UserError, match=name) as raised:
        load_dataset(name, data_dir=str(tmp_path), download=False)
    assert str(tmp_path) in str(raised.value) and "--data-dir" in str(raised.value)


def test_missing_fashion_mnist_suggests_the_debian_package(tmp_path, monkeypatch):
    monkeypatch.setattr(builtin, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "not-installed")
    with pytest.raises(UserError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist", data_dir=str(tmp_path), download=False)


def test_unknown_dataset_raises_user_error_listing_the_choices():
    with pytest.raises(UserError) as raised:
        load_dataset("imagenet")
    assert all(name in str(raised.value) for name in DATASETS)


def test_synthetic_has_the_documented_shapes(synthetic):
    assert synthetic.train.images.shape == (1024, 1, 16, 16) and synthetic.train.images.dtype == torch.uint8
    assert synthetic.test.images.shape == (512, 1, 16, 16) and synthetic.test.labels.dtype == torch.int64
    assert (synthetic.num_classes, synthetic.in_channels, synthetic.image_size) == (10, 1, 16)
    assert synthetic.source == "synthetic"
    assert set(synthetic.train.labels.tolist()) == set(range(10))


def test_synthetic_is_one_dataset_whatever_the_run_seed(synthetic):
    """Runs of seeds 0, 1, 2 ensembled together must share their data (they did not: members scored
    9-11% on each other's test sets). Label noise still follows the run's seed."""
    for seed in (0, 1, 12345):
        other = load_dataset("synthetic", seed=seed)
        assert torch.equal(other.train.images, synthetic.train.images)
        assert torch.equal(other.test.labels, synthetic.test.labels)
    noisy = [load_dataset("synthetic", seed=s, label_noise=0.2).train.labels for s in (0, 1)]
    assert not torch.equal(noisy[0], noisy[1])


def test_synthetic_classes_are_separable_by_nearest_class_mean(synthetic):
    # A cheap proxy for "learnable": the nearest class mean of the training images beats chance (10%) by far.
    train_x, train_y = synthetic.train.images.flatten(1).float(), synthetic.train.labels
    class_means = torch.stack([train_x[train_y == label].mean(0) for label in range(10)])
    predictions = torch.cdist(synthetic.test.images.flatten(1).float(), class_means).argmin(1)
    assert (predictions == synthetic.test.labels).float().mean() > 0.5


# --- label noise ---------------------------------------------------------------------------------


def test_label_noise_changes_exactly_round_p_n_labels_each_to_another_class(synthetic):
    noisy = load_dataset("synthetic", seed=0, label_noise=0.3)
    changed = noisy.train.labels != synthetic.train.labels
    assert changed.sum().item() == round(0.3 * 1024) == noisy.noisy_labels
    assert noisy.label_noise == 0.3
    assert noisy.train.labels.min() >= 0 and noisy.train.labels.max() < 10


def test_label_noise_is_deterministic_in_the_seed():
    first = load_dataset("synthetic", seed=3, label_noise=0.2)
    again = load_dataset("synthetic", seed=3, label_noise=0.2)
    assert torch.equal(first.train.labels, again.train.labels)


def test_label_noise_leaves_test_labels_and_images_untouched(synthetic):
    noisy = load_dataset("synthetic", seed=0, label_noise=0.5)
    assert torch.equal(noisy.test.labels, synthetic.test.labels)
    assert torch.equal(noisy.train.images, synthetic.train.images)


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5, float("nan")])
def test_label_noise_outside_unit_interval_raises_user_error(fraction):
    with pytest.raises(UserError, match=r"\[0, 1\)"):
        load_dataset("synthetic", label_noise=fraction)


# --- hold-out ------------------------------------------------------------------------------------


def test_split_holdout_partitions_the_examples_deterministically(synthetic):
    dataset = indexed_dataset(synthetic, count=100)
    kept, held = split_holdout(dataset.train, 0.25, seed=7)
    assert (len(kept), len(held)) == (75, 25)
    assert sorted(kept.labels.tolist() + held.labels.tolist()) == list(range(100))
    assert torch.equal(kept.images, dataset.train.images[kept.labels])
    kept_again, held_again = split_holdout(dataset.train, 0.25, seed=7)
    assert torch.equal(held.labels, held_again.labels) and torch.equal(kept.labels, kept_again.labels)
    assert not torch.equal(held.labels, split_holdout(dataset.train, 0.25, seed=8)[1].labels)


def test_validation_split_is_disjoint_from_training_and_drawn_apart_from_other_holdouts(synthetic):
    dataset = indexed_dataset(synthetic, count=100)
    kept, validation = hold_out_validation(dataset, 0.2, seed=3)
    assert len(validation) == 20 and len(kept.train) == 80
    assert not set(validation.labels.tolist()) & set(kept.train.labels.tolist())
    assert torch.equal(validation.labels, hold_out_validation(dataset, 0.2, seed=3)[1].labels)  # re-readable
    # the validation draw is salted apart from Spartan's evolution split at the same seed
    assert not torch.equal(validation.labels, split_holdout(dataset.train, 0.2, seed=3)[1].labels)
    assert hold_out_validation(dataset, 0.0, seed=3) == (dataset, None)


# --- batching ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "batch_size", "drop_last", "expected"), [(100, 32, False, 4), (100, 32, True, 3), (64, 32, False, 2)]
)
def test_num_batches_counts_partial_batches_unless_dropped(n, batch_size, drop_last, expected):
    assert num_batches(n, batch_size, drop_last) == expected


def test_train_epoch_visits_every_example_exactly_once(synthetic):
    dataset = indexed_dataset(synthetic, count=100)
    labels = labels_of_epoch(dataset, batch_size=32, seed=0)
    assert sorted(labels.tolist()) == list(range(100))
    assert labels.tolist() != list(range(100))  # shuffled


def test_drop_last_yields_only_full_batches(synthetic):
    dataset = indexed_dataset(synthetic, count=100)
    generator = torch.Generator().manual_seed(0)
    sizes = [len(y) for _, y in iterate_batches(dataset.train, 32, dataset=dataset, train=True,
                                                 generator=generator, drop_last=True)]
    assert sizes == [32, 32, 32] and len(sizes) == num_batches(100, 32, drop_last=True)


def test_same_generator_seed_gives_the_same_order_and_another_seed_does_not(synthetic):
    dataset = indexed_dataset(synthetic, count=100, augment="crop_flip")
    assert torch.equal(labels_of_epoch(dataset, 32, seed=5), labels_of_epoch(dataset, 32, seed=5))
    assert not torch.equal(labels_of_epoch(dataset, 32, seed=5), labels_of_epoch(dataset, 32, seed=6))


def test_same_generator_seed_gives_the_same_augmented_pixels(synthetic):
    dataset = indexed_dataset(synthetic, count=64, augment="crop_flip")
    first = [x for x, _ in iterate_batches(dataset.train, 64, dataset=dataset, train=True,
                                           generator=torch.Generator().manual_seed(1))]
    again = [x for x, _ in iterate_batches(dataset.train, 64, dataset=dataset, train=True,
                                           generator=torch.Generator().manual_seed(1))]
    assert torch.equal(first[0], again[0])


def test_eval_batches_are_in_order_normalised_and_unaugmented(synthetic):
    dataset = dataclasses.replace(synthetic, augment="crop_flip")  # must be ignored when train=False
    batches = list(iterate_batches(dataset.test, 200, dataset=dataset, train=False))
    assert [len(y) for _, y in batches] == [200, 200, 112]
    x = torch.cat([x for x, _ in batches])
    assert x.dtype == torch.float32 and x.shape == (512, 1, 16, 16)
    assert torch.equal(torch.cat([y for _, y in batches]), dataset.test.labels)
    torch.testing.assert_close(x, normalised(dataset.test.images, dataset))


def test_normalised_train_batches_have_about_zero_mean_and_unit_std(synthetic):
    x = torch.cat([x for x, _ in iterate_batches(synthetic.train, 256, dataset=synthetic, train=True,
                                                 generator=torch.Generator().manual_seed(0))])
    assert abs(x.mean().item()) < 1e-3 and x.std().item() == pytest.approx(1.0, abs=1e-3)


def test_crop_flip_keeps_shape_and_pairs_but_changes_pixels(synthetic):
    dataset = indexed_dataset(synthetic, count=64, augment="crop_flip")
    generator = torch.Generator().manual_seed(0)
    x, y = next(iterate_batches(dataset.train, 64, dataset=dataset, train=True, generator=generator))
    assert x.shape == (64, 1, 16, 16) and x.dtype == torch.float32
    originals = normalised(dataset.train.images[y], dataset)
    assert not torch.equal(x, originals)
    # Every output is one of the reflect-padded crops (flipped or not) of the example its label names.
    distance = (all_crop_flips(originals) - x[:, None]).abs().flatten(2).amax(-1).amin(-1)  # (B,)
    assert distance.max() < 1e-5


def test_flip_alone_mirrors_some_images_and_moves_no_pixel_otherwise(synthetic):
    dataset = indexed_dataset(synthetic, count=64, augment="flip")
    x, y = next(iterate_batches(dataset.train, 64, dataset=dataset, train=True, generator=torch.Generator().manual_seed(0)))
    originals = normalised(dataset.train.images[y], dataset)
    kept = (x - originals).abs().flatten(1).amax(1) < 1e-5
    mirrored = (x - originals.flip(-1)).abs().flatten(1).amax(1) < 1e-5
    assert bool((kept | mirrored).all()) and 0 < int(mirrored.sum()) < 64  # each image whole, about half mirrored


def test_augment_option_overrides_the_datasets_own_and_refuses_inputs_that_are_not_images(tmp_path):
    from fastflat.config import load_config
    from fastflat.loop.assembly import build_trainer
    from fastflat.runs.rundir import RunDir

    base = {"dataset": "synthetic", "subset": 64, "batch_size": 16, "out": str(tmp_path)}
    for option, augment in (("auto", "none"), ("flip", "flip"), ("crop-flip", "crop_flip")):
        trainer = build_trainer(load_config(overrides={**base, "augment": option}), RunDir.create(tmp_path, option))
        assert trainer.data.augment == augment
    features = (torch.randn(32, 6), torch.randint(0, 3, (32,)))
    cfg = load_config(overrides={**base, "augment": "flip", "dataset": "custom"})
    with pytest.raises(UserError, match="--augment flip flips and crops images"):
        build_trainer(cfg, RunDir.create(tmp_path, "features"), data=(features, features))


def all_crop_flips(images):
    """(B, C, H, W) -> (B, 2 * (2P+1)^2, C, H, W): every crop of the P-pixel reflect-padded image and its mirror."""
    height, width, pad = images.shape[-2], images.shape[-1], CROP_PADDING
    padded = F.pad(images, (pad,) * 4, mode="reflect")
    views = []
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            crop = padded[:, :, dy:dy + height, dx:dx + width]
            views += [crop, crop.flip(-1)]
    return torch.stack(views, dim=1)


def test_no_augmentation_for_datasets_without_it(synthetic):
    dataset = indexed_dataset(synthetic, count=64, augment="none")
    x, y = next(iterate_batches(dataset.train, 64, dataset=dataset, train=True,
                                generator=torch.Generator().manual_seed(0)))
    torch.testing.assert_close(x, normalised(dataset.train.images[y], dataset))
