"""The config is declared once (type, choices, bounds, role per field) and checked whenever one is built."""

from __future__ import annotations

import dataclasses

import pytest

from mnist_classifier.config import ServeConfig, TrainConfig, check_field, parse_value
from mnist_classifier.errors import UserError


@pytest.mark.parametrize("changes, message", [
    ({"lr": 0}, "--lr must be > 0, got 0"),
    ({"epochs": 0}, "--epochs must be >= 1, got 0"),
    ({"dropout": 1.0}, "--dropout must be in [0, 1), got 1.0"),
    ({"optimizer": "lbfgs"}, "unknown --optimizer 'lbfgs'"),
    ({"preprocess": "crop"}, "unknown --preprocess 'crop'"),
    ({"batch_size": 64.5}, "--batch-size must be a whole number, got 64.5"),
    ({"augment": "yes"}, "--augment must be true or false"),
    ({"cuda_graphs": True, "augment": True}, "--cuda-graphs cannot be combined"),
    ({"input_size": 8}, "--input-size must be 0"),
])
def test_every_way_of_building_a_config_checks_it(changes, message):
    for build in (lambda: TrainConfig(**changes),
                  lambda: dataclasses.replace(TrainConfig(), **changes),
                  lambda: TrainConfig.from_recipe("guide", **changes),
                  lambda: TrainConfig.from_dict({**TrainConfig().to_dict(), **changes})):
        with pytest.raises(UserError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
            build()


def test_configs_are_frozen_and_typed_once_built():
    cfg = TrainConfig(lr=1)
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)  # an int widens to the field's float
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lr = 0.5  # type: ignore[misc]
    with pytest.raises(UserError, match="--port must be in \\[0, 65535\\]"):
        ServeConfig(port=70000)


def test_a_single_value_is_judged_by_the_same_declaration():
    assert parse_value(TrainConfig, "batch_size", "128") == 128
    assert parse_value(TrainConfig, "augment", "true") is True
    assert check_field(TrainConfig, "lr", 3) == 3.0
    with pytest.raises(UserError, match="unknown setting 'colour'"):
        check_field(TrainConfig, "colour", 1)
    with pytest.raises(UserError, match="--lr: 'fast' is not a valid float"):
        parse_value(TrainConfig, "lr", "fast")
