"""Every typed config travels through JSON unchanged (napari_glimpse._serde.DictConfig)."""

from __future__ import annotations

import json

import pytest

from napari_glimpse.coarse import CoarseConfig
from napari_glimpse.fine import FineConfig
from napari_glimpse.finetune import FinetuneConfig
from napari_glimpse.glimpse_only import GlimpseOnlyConfig
from napari_glimpse.model import ModelConfig
from napari_glimpse.training import TrainConfig

CONFIGS = [CoarseConfig, FineConfig, FinetuneConfig, GlimpseOnlyConfig, ModelConfig, TrainConfig]


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_round_trip_through_json(cls):
    cfg = cls()
    back = cls.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg
    assert all(not isinstance(v, tuple) for v in cfg.to_dict().values())  # JSON-ready


def test_unknown_keys_are_ignored_and_lists_become_the_typed_tuples():
    cfg = FineConfig.from_dict({"jitter_mm": [1.0, 3.0], "a_key_from_another_version": 1})
    assert cfg.jitter_mm == (1.0, 3.0) and isinstance(cfg.jitter_mm, tuple)
    assert ModelConfig.from_dict({"hidden": [64]}).hidden == (64,)
    assert CoarseConfig.from_dict({"input_hw": [160, 128]}).input_hw == (160, 128)
