"""Your own model and data: torchvision and timm classifiers by name, an ImageFolder tree, and
fastflat.train() with any nn.Module and TensorDatasets (then resumed with them)."""

import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import fastflat
from fastflat.cli import main
from fastflat.errors import UserError
from fastflat.data.models import build_model
from fastflat.loop import resume

from helpers import StopAt


@pytest.fixture(scope="module")
def image_tree(tmp_path_factory):
    """train/ and val/ folders of 3 colour classes, PNGs of uneven sizes (the loader resizes)."""
    root = tmp_path_factory.mktemp("tree")
    rng = np.random.default_rng(0)
    for split, count in (("train", 20), ("val", 6)):
        for c, colour in enumerate(((200, 30, 30), (30, 200, 30), (30, 30, 200))):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(rng.normal(colour, 40, size=(18 + i % 4, 20, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


@pytest.mark.parametrize("model", ["torchvision:resnet18", "timm:resnet10t"])
def test_named_models_train_a_few_steps_on_an_image_folder(image_tree, tmp_path, capsys, model):
    code = main(["train", "--dataset", f"folder:{image_tree}", "--model", model, "--max-steps", "2",
                 "--batch-size", "16", "--image-size", "16", "--device", "cpu", "--out", str(tmp_path), "--name", "r"])
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert code == 0 and summary["steps"] == 2 and summary["train_size"] == 60 and summary["test_acc"] is not None
    saved = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)
    plain = build_model(model, 3, 3, 16)
    plain.load_state_dict(saved["model"])  # a plain model of that name loads the run's weights
    assert plain(torch.zeros(2, 3, 16, 16)).shape == (2, 3)


def test_grayscale_data_feeds_a_torchvision_rgb_stem():
    model = build_model("torchvision:resnet18", 1, 10, 28)
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_a_missing_timm_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm now raises ImportError
    with pytest.raises(UserError, match=r"pip install 'fastflat\[timm\]'"):
        build_model("timm:resnet10t", 3, 10, 32)


@pytest.mark.parametrize("args, message", [
    (["--dataset", "folder:/nonexistent/tree"], "expected /nonexistent/tree/train"),
    (["--model", "torchvision:not_a_net", "--dataset", "synthetic"], "torchvision has no classifier"),
    (["--dataset", "imagenet-21k"], "folder:PATH"),
])
def test_bad_model_or_data_is_one_line_and_exit_2(tmp_path, capsys, args, message):
    assert main(["train", *args, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def _tabular(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 20, generator=g)
    teacher = torch.randn(20, 3, generator=torch.Generator().manual_seed(99))
    return x, (x @ teacher).argmax(1)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 3))


def test_fastflat_train_takes_your_module_and_tensor_datasets_and_resumes_exactly(tmp_path):
    train_set = torch.utils.data.TensorDataset(*_tabular(500, 0))
    test_pair = _tabular(200, 1)
    settings = {"method": "sam", "epochs": 3, "batch_size": 50, "device": "cpu", "sam": {"rho": 0.05}}
    whole = fastflat.train({**settings, "out": str(tmp_path / "a")}, model=_mlp(), data=(train_set, test_pair))
    assert whole["model"] == "custom:Sequential" and whole["dataset"] == "custom" and whole["test_acc"] > 70
    with pytest.raises(KeyboardInterrupt):
        fastflat.train({**settings, "out": str(tmp_path / "b"), "name": "r"}, model=_mlp(),
                       data=(train_set, test_pair), hooks=StopAt(step=13))
    with pytest.raises(UserError, match="data passed in Python"):
        resume(tmp_path / "b" / "r")
    again = resume(tmp_path / "b" / "r", model=_mlp(), data=(train_set, test_pair))
    assert again["test_acc"] == whole["test_acc"] and again["train_loss"] == whole["train_loss"]
