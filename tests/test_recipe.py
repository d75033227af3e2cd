"""Recipes (napari_glimpse.recipe): the packaged default describes the shipped model, and
``train --recipe`` builds a model of its kind end to end."""

from __future__ import annotations

import importlib.util
import json
import re
from dataclasses import replace

import numpy as np
import pytest
from conftest import draw_blob, save_png, write_csv

from napari_glimpse.checkpoint import read_checkpoint
from napari_glimpse.cli import build_parser, main
from napari_glimpse.coarse import CoarseConfig
from napari_glimpse.errors import GlimpseError
from napari_glimpse.fine import FineConfig
from napari_glimpse.inference import DEFAULT_MODEL, GlimpseModel
from napari_glimpse.model import ModelConfig
from napari_glimpse.recipe import (
    RECIPES,
    InferenceSettings,
    QuantizeSettings,
    Recipe,
    RecipeStage,
    TuneConfig,
    build,
    load_recipe,
    packaged,
)
from napari_glimpse.training import TrainConfig

ONNX = importlib.util.find_spec("onnx") is not None


@pytest.fixture(scope="module")
def shipped():
    return read_checkpoint(DEFAULT_MODEL)


def test_default_recipe_parses_into_typed_objects():
    r = load_recipe("default")
    assert "default" in packaged() and isinstance(r, Recipe) and r.name == "default"
    assert isinstance(r.model, ModelConfig)
    assert isinstance(r.inference, InferenceSettings) and isinstance(r.quantize, QuantizeSettings)
    assert all(isinstance(s, RecipeStage) for s in r.stages)
    assert [s.kind for s in r.stages] == ["coarse", "fine", "fine", "fine", "fine", "tune", "tune"]
    assert isinstance(r.stages[0].config, CoarseConfig)
    assert all(isinstance(s.config, FineConfig) for s in r.stages[1:5])
    assert [s.config.nets for s in r.stages[5:]] == ["fine", "coarse"] and isinstance(r.stages[6].config, TuneConfig)
    assert r.minutes == pytest.approx(sum(s.minutes for s in r.stages)) == pytest.approx(256.6)
    assert r.content == json.loads((RECIPES / "default.json").read_text())
    assert r.notes and all(s.notes for s in r.stages) and r.inference.notes and r.quantize.notes
    # a file path reads the same recipe
    assert load_recipe(RECIPES / "default.json") == r


def test_default_recipe_describes_the_shipped_model(shipped):
    r = load_recipe("default")
    meta = shipped["meta"]
    inf = r.inference.to_meta()
    assert inf == {k: meta[k] for k in inf}
    assert r.model.to_dict() == shipped["model_config"]
    members = shipped["fine_members"]
    fines, tune, coarse_tune = r.stages[1:5], r.stages[5], r.stages[6]
    # the nets' configs record the artefacts their tune stages trained them with
    assert r.stages[0].config.to_dict() | {"artefacts": coarse_tune.config.artefacts} == shipped["coarse_config"]
    tuned = {"artefacts": tune.config.artefacts}
    assert tune.config.artefacts > 0 and coarse_tune.config.artefacts > 0
    assert [s.config.to_dict() | tuned for s in fines] == [m["config"] for m in members]
    assert [replace(s.config, **tuned) for s in fines] == [FineConfig.from_dict(m["config"]) for m in members]
    assert [s.average_decay for s in fines] == meta["fine_average_decay"]
    assert r.stages[0].average_decay is None
    # each net's batch-norm step counter is its number of optimizer steps: its stage's, then its
    # tune stage's
    counters = [shipped["coarse_state_dict"]["stem.0.1.num_batches_tracked"]]
    counters += [m["state_dict"]["stem.0.1.num_batches_tracked"] for m in members]
    assert ([r.stages[0].max_steps + coarse_tune.max_steps] + [s.max_steps + tune.max_steps for s in fines]
            == [int(c) for c in counters])
    q = r.quantize
    assert q.int8 and meta["int8"] == {"stages": list(q.stages), "float_ends": q.float_ends,
                                       "calibration_images": q.calibration_images}
    assert q.half_weights == (shipped.get("weights_stored_as") == "float16")
    assert r.ground_truth == shipped["train_config"]["ground_truth"]


def test_help_states_the_full_budget():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    text = sub.choices["train"].format_help()
    assert f"{load_recipe('default').minutes:.0f} min in full" in " ".join(text.split())


def _write_19_landmark_set(root, n: int = 3, h: int = 320, w: int = 256, seed: int = 0):
    """``n`` small synthetic images with 19 blobs each (the ISBI landmark count)."""
    rng = np.random.default_rng(seed)
    base = np.stack([rng.uniform(30, w - 30, 19), rng.uniform(30, h - 30, 19)], -1)
    coords = np.round(base[None] + rng.uniform(-6, 6, size=(n, 19, 2)))
    names = [f"{i + 1:03d}.png" for i in range(n)]
    for name, c in zip(names, coords):
        img = rng.normal(40, 8, size=(h, w)).clip(0, 255)
        for k, (x, y) in enumerate(c):
            draw_blob(img, k % 3, x, y)
        save_png(root / "images" / name, img.astype(np.uint8))
    write_csv(root / "train_senior.csv", names, coords)
    return root / "images" / names[0]


def test_train_recipe_default_end_to_end(tmp_path, capsys):
    image = _write_19_landmark_set(tmp_path / "data")
    out = tmp_path / "model.pt"
    rc = main(["train", "--recipe", "default", "--data", str(tmp_path / "data"), "--out", str(out),
               "--time-budget", "0.05", "--max-steps", "3", "--device", "cpu"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "wrote" in captured.out and "recipe default" in captured.out
    model = GlimpseModel.load(out, "cpu")
    pts = model.predict(str(image), spacing=0.1).final
    assert pts.shape == (19, 2) and np.isfinite(pts).all()
    r = load_recipe("default")
    rec = model.meta["recipe"]
    assert rec["name"] == "default" and rec["content"] == r.content
    assert rec["budget_min"] == pytest.approx(0.05) and rec["full_budget_min"] == pytest.approx(r.minutes)
    assert [s["name"] for s in rec["stages"]] == [s.name for s in r.stages]
    assert all(0 < s["steps"] <= 3 for s in rec["stages"])
    assert {k: model.meta[k] for k in r.inference.to_meta()} == r.inference.to_meta()
    assert len(model.fine.members) == 4 and model.fine.members[3].cfg.context == 4
    assert [m.cfg.artefacts for m in model.fine.members] == [r.stages[5].config.artefacts] * 4  # the tune stages
    assert model.coarse.cfg.artefacts == r.stages[6].config.artefacts
    assert read_checkpoint(out)["weights_stored_as"] == "float16"
    if ONNX:
        assert model.int8_nets == (5, 5)


def test_recipe_refuses_conflicting_flags(tmp_path, capsys):
    rc = main(["train", "--recipe", "default", "--data", str(tmp_path), "--out", str(tmp_path / "m.pt"),
               "--seed", "3", "--fine-minutes", "2"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert re.search(r"--seed, --fine-minutes cannot be given with it", err)


def test_unknown_recipe_and_bad_recipe_files(tmp_path):
    with pytest.raises(GlimpseError, match="no recipe 'nope' in the package"):
        load_recipe("nope")
    content = json.loads((RECIPES / "default.json").read_text())
    content["stages"].insert(1, content["stages"].pop(5))  # the fine nets' tune stage before them
    early = tmp_path / "early.json"
    early.write_text(json.dumps(content))
    with pytest.raises(GlimpseError, match="stage 2: a tune stage tunes the coarse or fine nets, after all of them"):
        load_recipe(early)
    content = json.loads((RECIPES / "default.json").read_text())
    content["stages"][1]["config"]["sigmaa"] = 2.0
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(content))
    with pytest.raises(GlimpseError, match="stage 2 config has unknown keys sigmaa"):
        load_recipe(bad)
    content = json.loads((RECIPES / "default.json").read_text())
    content["stages"] = content["stages"][1:]
    bad.write_text(json.dumps(content))
    with pytest.raises(GlimpseError, match="one coarse stage first"):
        load_recipe(bad)


def test_a_recipe_file_with_a_glimpse_stage(kaggle_dataset, tmp_path):
    """A recipe of one's own: tiny nets, a glimpse stage, float weights, no int8 graphs."""
    d = kaggle_dataset(n=3)
    content = json.loads((RECIPES / "default.json").read_text())
    content["name"] = "tiny"
    content["model"].update(n_levels=3, width=8, hidden=[32, 16])
    coarse, fine = content["stages"][0], content["stages"][4]
    coarse["config"].update(input_hw=[64, 48], width=4, batch_size=2)
    fine["config"].update(patch=32, width=4, batch_size=4, context=2)
    glimpse = {"kind": "glimpse", "name": "glimpse", "minutes": 1.0, "max_steps": 2,
               "config": TrainConfig(batch_size=4, save_every_s=1e9).to_dict()}
    content["stages"] = [coarse, fine, glimpse]
    content["quantize"].update(int8=False, half_weights=False)
    content["inference"]["iterations"] = 1
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(content))
    seen = []
    model = build(path, d["root"], tmp_path / "tiny.pt", device="cpu", progress=seen.append, max_steps=2)
    assert [s["steps"] for s in model.meta["recipe"]["stages"]] == [2, 2, 2]
    assert model.meta["train_steps"] == 2 and model.meta["glimpse_net"] == "trained"
    assert seen and seen[-1]["recipe_stage"] == "glimpse" and 0 < seen[-1]["overall_progress"] <= 1
    loaded = GlimpseModel.load(tmp_path / "tiny.pt", "cpu")
    assert loaded.default_iterations == 1 and loaded.int8_nets == (0, 2)
    assert loaded.train_config["batch_size"] == 4
    assert np.isfinite(loaded.predict(str(d["paths"][0]), spacing=0.1).final).all()


def test_packaged_recipe_not_hidden_by_a_folder_of_its_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("glimpse", "default", "nope"):
        (tmp_path / name).mkdir()
    # a packaged name wins over a folder of that name where the command runs
    assert load_recipe("glimpse").name == "glimpse"
    assert load_recipe("default") == load_recipe(RECIPES / "default.json")
    # a folder that is not a packaged name is still refused as a recipe file; a file path still works
    with pytest.raises(GlimpseError, match="recipe file not found: nope"):
        load_recipe("nope")
    (tmp_path / "mine.json").write_text((RECIPES / "default.json").read_text())
    assert load_recipe("mine.json").name == "default"
    (tmp_path / "mine").write_text((RECIPES / "default.json").read_text())
    assert load_recipe("mine").name == "default"
