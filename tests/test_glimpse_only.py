"""The glimpse-only model (napari_glimpse.glimpse_only) and its recipe: start curriculum, rollouts,
augmentation, weight average, validation after 1/2/3/5 steps, the step count chosen there, the file."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import REAL_DATA

from napari_glimpse.errors import GlimpseError
from napari_glimpse.glimpse import PyramidStack
from napari_glimpse.glimpse_only import (
    Batch,
    GlimpseOnlyConfig,
    WeightAverage,
    augment,
    choose_steps,
    curriculum_value,
    draw_starts,
    rollout,
    split_by_ids,
    train_glimpse_only,
    validation_line,
)
from napari_glimpse.inference import GlimpseModel
from napari_glimpse.io import load_dataset
from napari_glimpse.model import GlimpseModelNet, ModelConfig
from napari_glimpse.pyramid import build_pyramid
from napari_glimpse.recipe import build, load_recipe

TINY = ModelConfig(n_landmarks=3, n_levels=3, width=8, hidden=(64, 32))


def test_curriculum_narrows_then_holds():
    assert curriculum_value((1.5, 0.5), 0.0, 0.7) == 1.5
    assert curriculum_value((1.5, 0.5), 0.35, 0.7) == pytest.approx(1.0)
    assert curriculum_value((1.5, 0.5), 0.9, 0.7) == 0.5


def _batch(n=400):
    target = torch.full((n, 2), 100.0)
    return Batch(torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long), target,
                 torch.full((n, 2), 256.0))


def test_starts_follow_the_curriculum():
    cfg = GlimpseOnlyConfig()
    mean, std = torch.tensor([[50.0, 60.0]]), torch.tensor([[10.0, 10.0]])
    gen = torch.Generator().manual_seed(0)
    start, roll = draw_starts(cfg, 0.0, _batch(), mean, std, gen)
    assert not roll.any()  # no rollouts at first
    start, roll = draw_starts(cfg, 1.0, _batch(), mean, std, gen)
    assert 0.3 < roll.float().mean() < 0.6
    assert torch.equal(start[roll], mean.expand(int(roll.sum()), 2))  # rollouts begin at the mean start
    near = (start[~roll] - 100).norm(dim=1) < 200
    assert near.float().mean() > 0.4


def test_rollout_follows_the_net_without_gradient():
    img = (np.random.default_rng(0).random((128, 96)) * 255).astype(np.uint8)
    stack = PyramidStack([build_pyramid(img, 3, 64)])
    net = GlimpseModelNet(TINY)
    torch.nn.init.constant_(net.nets[0].head_b, 0.1)  # every step moves 10 px right and down
    b = Batch(torch.zeros(3, dtype=torch.long), torch.arange(3), torch.zeros(3, 2), torch.tensor([[96.0, 128.0]] * 3))
    start = torch.full((3, 2), 20.0)
    out = rollout(net, stack, b, start, torch.tensor([0, 1, 3]), 100.0)
    assert not out.requires_grad
    np.testing.assert_allclose(out[:, 0].numpy(), [20, 30, 50], atol=0.5)
    assert net.training  # back in training mode


def test_augment_keeps_shape_and_varies_contrast():
    p = torch.linspace(0, 255, 64 * 64).reshape(1, 1, 64, 64).repeat(8, 3, 1, 1)
    out = augment(p, GlimpseOnlyConfig(noise=0.0), torch.Generator().manual_seed(0))
    assert out.shape == p.shape and torch.isfinite(out).all()
    assert out.std(dim=(1, 2, 3)).unique().numel() > 1


def test_weight_average_moves_towards_the_weights():
    net = GlimpseModelNet(TINY)
    avg = WeightAverage(net, 0.9)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    before = [a.clone() for a in avg.net.parameters()]
    avg.update(net)
    moved = [(a.detach() - b).abs().max() for a, b in zip(avg.net.parameters(), before)]
    assert all(0 < float(m) < 1 for m in moved)


def test_choose_steps_prefers_fewer_within_the_margin():
    val = {"steps": {1: {"mre_mm": 3.0}, 2: {"mre_mm": 2.001}, 3: {"mre_mm": 2.0}, 5: {"mre_mm": 2.2}}}
    assert choose_steps(val) == 2
    assert choose_steps(val, margin_mm=0.0) == 3


def test_split_by_ids(tiny_data):
    ds = load_dataset(tiny_data["root"], "train")  # 001-006
    tr, va = split_by_ids(ds, [1, 4], [5, 6])
    assert [p.stem for p in tr.image_paths] == ["001", "002", "003", "004"]
    assert [p.stem for p in va.image_paths] == ["005", "006"]
    assert split_by_ids(ds, [1, 6], [131, 150])[1] is None
    with pytest.raises(GlimpseError, match="no training image"):
        split_by_ids(ds, [200, 300], [1, 2])


def test_train_validate_choose(tiny_data):
    ds = load_dataset(tiny_data["root"], "train")
    tr, va = split_by_ids(ds, [1, 4], [5, 6])
    cfg = GlimpseOnlyConfig(batch_size=8, rollout_fraction=(0.5, 0.5), val_every_s=1e9)
    model = train_glimpse_only(tr, va, TINY, cfg, budget_s=1e9, max_steps=4, device="cpu", progress=False,
                               eval_steps=5)
    v = model.meta["validation"]
    assert sorted(v["steps"]) == [1, 2, 3, 4, 5] and v["n_images"] == 2
    assert 1 <= model.meta["iterations"] <= 5 and model.meta["weights"] in ("average", "last")
    assert model.meta["train_steps"] == 4 and model.coarse is None
    assert "1 step" in validation_line(v) and "5 steps" in validation_line(v)


def test_the_packaged_recipe():
    r = load_recipe("glimpse")
    assert r.validation == {"train_ids": [1, 130], "val_ids": [131, 150], "eval_steps": [1, 2, 3, 5]}
    assert [s.kind for s in r.stages] == ["glimpse_only"] * 2 and r.minutes == 170  # <= 3 h on 2 CPU cores
    assert [s.name for s in r.stages] == ["glimpse", "glimpse-2"]
    assert r.model.n_levels == 6 and r.model.trunk == "compact" and r.quantize.half_weights
    assert isinstance(r.stages[0].config, GlimpseOnlyConfig)


def test_build_a_glimpse_recipe_end_to_end(tiny_data, tmp_path):
    with open(load_recipe("glimpse").source, encoding="utf-8") as f:
        content = json.load(f)
    content["model"].update(n_levels=3, width=8, hidden=[64, 32])
    content["validation"].update(train_ids=[1, 4], val_ids=[5, 6])
    content["stages"][0]["config"].update(batch_size=8, val_every_s=1e9)
    (tmp_path / "r.json").write_text(json.dumps(content))
    out = tmp_path / "g.pt"
    model = build(tmp_path / "r.json", tiny_data["root"], out, max_steps=3, device="cpu", progress=False)
    loaded = GlimpseModel.load(out, "cpu")
    assert loaded.coarse is None and loaded.meta["iterations"] == model.meta["iterations"]
    assert loaded.meta["recipe"]["name"] == "glimpse" and loaded.meta["validation"]["images"] == ["005.png", "006.png"]
    assert out.stat().st_size < 10e6
    tr = loaded.predict(tiny_data["train"]["paths"][0], facing="right", spacing=0.1)
    assert tr.iterations == loaded.meta["iterations"] and np.isfinite(tr.final).all()
    mean = loaded.mean_start  # the journey begins at the mean training position (same-size images)
    np.testing.assert_allclose(tr.positions[0], mean, atol=1e-3)


@pytest.mark.skipif(not REAL_DATA.exists(), reason="needs the ISBI data")
def test_the_shipped_glimpse_model_walks_from_the_mean_start_to_the_landmarks():
    from napari_glimpse.inference import GlimpseModel, resolve_model
    from napari_glimpse.io import load_dataset

    model = GlimpseModel.load(resolve_model("glimpse"), device="cpu")
    assert model.coarse is None and model.default_iterations == 5
    ds = load_dataset(REAL_DATA, "train")
    i = 140  # 141.jpg: a validation image (the net trained on 001-130)
    tr = model.predict(ds.image(i), facing="right")
    err = np.linalg.norm(tr.positions - ds.ground_truth("mean")[i], axis=-1).mean(-1) * 0.1  # per step
    assert np.allclose(tr.positions[0], model.mean_start)  # the journey starts at the mean position
    assert err[0] > 4 and err[-1] < 2.5 and err[-1] < err[1] < err[0]


def test_a_build_goes_on_from_a_model_of_its_first_stages(tiny_data, tmp_path, monkeypatch):
    """``--init``: a model made by the recipe's first stages trains on with the others only (its net
    is where they start); a model of another recipe, or one with every stage done, is refused."""
    import napari_glimpse.glimpse_only as go

    with open(load_recipe("glimpse").source, encoding="utf-8") as f:
        content = json.load(f)
    content["model"].update(n_levels=3, width=8, hidden=[64, 32])
    content["validation"].update(train_ids=[1, 4], val_ids=[5, 6])
    for st in content["stages"]:
        st["config"].update(batch_size=8, val_every_s=1e9)
    whole, first = tmp_path / "r.json", tmp_path / "first.json"
    whole.write_text(json.dumps(content))
    first.write_text(json.dumps({**content, "stages": content["stages"][:1]}))
    build(first, tiny_data["root"], tmp_path / "one.pt", max_steps=2, device="cpu", progress=False)
    one = GlimpseModel.load(tmp_path / "one.pt", "cpu")
    starts, real = [], go.train_glimpse_only

    def spy(*args, **kwargs):
        starts.append({k: v.clone() for k, v in args[-1].net.state_dict().items()})
        return real(*args, **kwargs)

    monkeypatch.setattr(go, "train_glimpse_only", spy)
    both = build(whole, tiny_data["root"], tmp_path / "both.pt", max_steps=2, device="cpu", progress=False, init=one)
    assert len(starts) == 1  # the second stage only, from the first's net
    assert all(torch.equal(v, one.net.state_dict()[k]) for k, v in starts[0].items())
    assert [(r["name"], r["steps"]) for r in both.meta["recipe"]["stages"]] == [("glimpse", 2), ("glimpse-2", 2)]
    assert both.meta["train_steps"] == 4
    assert both.meta["train_wall_s"] == pytest.approx(sum(r["wall_s"] for r in both.meta["recipe"]["stages"]))
    with pytest.raises(GlimpseError, match="every stage"):
        build(whole, tiny_data["root"], tmp_path / "x.pt", max_steps=1, device="cpu", progress=False,
              init=GlimpseModel.load(tmp_path / "both.pt", "cpu"))
    with pytest.raises(GlimpseError, match="not made by the first stages"):
        build(whole, tiny_data["root"], tmp_path / "x.pt", max_steps=1, device="cpu", progress=False,
              init=GlimpseModel(one.net, one.landmark_names, 0.1, one.mean_start))
