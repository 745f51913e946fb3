"""Config: defaults <- YAML <- CLI overrides; every bad key or value is one UserError naming it."""

import re

import pytest

from fastflat.config import TrainConfig, config_from_dict, load_config, to_dict
from fastflat.errors import UserError


def _yaml(tmp_path, text):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_defaults_without_file():
    assert load_config() == TrainConfig()


def test_overrides_beat_the_file_and_the_file_beats_defaults(tmp_path):
    path = _yaml(tmp_path, "method: sam\nlr: 0.2\nsam:\n  rho: 0.1\n  norm: linf\n")
    cfg = load_config(path, {"lr": 0.3, "sam.rho": 0.2, "epochs": None})
    assert (cfg.method, cfg.lr, cfg.sam.rho, cfg.sam.norm, cfg.epochs) == ("sam", 0.3, 0.2, "linf", TrainConfig().epochs)


def test_round_trip_through_a_dict():
    cfg = load_config(overrides={"method": "sam", "sam.m": 16, "clip_grad": 1.0})
    assert config_from_dict(to_dict(cfg)) == cfg


@pytest.mark.parametrize("text, fragment", [
    ("lrr: 0.1\n", "'lrr'"),
    ("sam:\n  rhoo: 0.1\n", "'sam.rhoo'"),
    ("lr: fast\n", "lr = 'fast'"),
    ("epochs: 1.5\n", "epochs = 1.5"),
    ("sam: 3\n", "sam must be a mapping"),
    ("- a\n- b\n", "must hold a mapping"),
    ("lr: [1, 2\n", "not valid YAML at line"),
])
def test_malformed_config_files_name_the_problem(tmp_path, text, fragment):
    with pytest.raises(UserError) as info:
        load_config(_yaml(tmp_path, text))
    assert fragment in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("overrides, fragment", [
    ({"method": "adam"}, "method = 'adam'"),
    ({"lr": 0}, "lr = 0"),
    ({"lr": -1.0}, "lr = -1.0"),
    ({"sam.rho": -0.1}, "sam.rho = -0.1"),
    ({"sam.norm": "l1"}, "sam.norm = 'l1'"),
    ({"dataset": "imagenet"}, "dataset = 'imagenet'"),
    ({"label_noise": 1.0}, "label_noise = 1.0"),
    ({"nesterov": True, "momentum": 0.0}, "nesterov"),
    ({"clip_grad": 0.0}, "clip_grad = 0.0"),
    ({"label_smoothing": 1.0}, "label_smoothing = 1.0"),
    ({"label_smoothing": -0.1}, "label_smoothing = -0.1"),
    ({"memory_format": "nhwc"}, "memory_format = 'nhwc'"),
])
def test_bad_values_are_rejected(overrides, fragment):
    with pytest.raises(UserError) as info:
        load_config(overrides=overrides)
    assert fragment in str(info.value)


def test_missing_config_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_string_booleans_from_the_command_line():
    assert load_config(overrides={"sam.adaptive": "true"}).sam.adaptive is True
    with pytest.raises(UserError, match="sam.adaptive"):
        load_config(overrides={"sam.adaptive": "maybe"})


@pytest.mark.parametrize("key", ["sigma", "es_lr", "grad_lr", "temperature"])
def test_spartan_scales_must_be_positive_and_the_error_names_the_key(key):
    with pytest.raises(UserError, match=f"spartan.{key} = 0.0"):
        load_config(overrides={f"spartan.{key}": 0.0})


@pytest.mark.parametrize("given, says", [({"rho": 0.1}, "unknown config key 'rho' (did you mean sam.rho?)"),
                                         ({"method": "sma"}, "(did you mean sam?)"),
                                         ({"sam": {"rhoo": 1}}, "unknown config key 'sam.rhoo' (did you mean sam.rho?)"),
                                         ({"epoch": 3}, "(did you mean epochs?)")])
def test_a_misspelt_key_or_value_gets_a_did_you_mean(given, says):
    with pytest.raises(UserError, match=re.escape(says)):
        load_config(None, given)


@pytest.mark.parametrize("argv, says", [(["train", "--method", "sma"], "(did you mean sam?)"),
                                        (["train", "--schedule", "cosin"], "(did you mean cosine?)"),
                                        (["curve", "--from", "a", "--to", "b", "--curve", "bezeir"], "(did you mean bezier?)")])
def test_a_misspelt_choice_on_the_command_line_gets_a_did_you_mean(capsys, argv, says):
    from fastflat.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert says in err and err.count("\n") == 1
