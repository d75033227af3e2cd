"""The detector as an ordered list of stages (napari_glimpse.stages): which stages a model has and
in what order, their specs as the meta says, running them by hand against predict, the int8
graphs held by the stages' runtimes (napari_glimpse.runtime) rather than by the nets, and
InferenceSpec.of_meta.

Uses conftest's tiny models: the glimpse-only tiny model, and the staged one (a blob-finding
coarse net and a fine ensemble of two, 3 nets), with and without int8 graphs."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import TINY_COARSE_CONFIG, TINY_FINE_CONFIG, randomise_weights

from napari_glimpse.coarse import CoarseConfig, CoarseNet
from napari_glimpse.fine import FineConfig, FineEnsemble, FineNet
from napari_glimpse.inference import GlimpseModel
from napari_glimpse.io import read_image
from napari_glimpse.runtime import Int8Backend, Int8Net, NetRuntime, weights_key
from napari_glimpse.stages import (
    CoarseSpec,
    CoarseStage,
    FineSpec,
    FineStage,
    GlimpseSpec,
    GlimpseStage,
    InferenceSpec,
)

N_NETS = 3  # the staged tiny model's: 1 coarse + 2 fine


@pytest.fixture(scope="module")
def image(tiny_data):
    return read_image(tiny_data["test1"]["paths"][0])  # 256 x 256, three blobs


@pytest.fixture
def staged(tiny_staged_model_path):
    """The staged tiny model, float (safe to modify)."""
    return GlimpseModel.load(tiny_staged_model_path, "cpu")


@pytest.fixture
def quantized(tiny_quantized_model_path):
    """The staged tiny model with int8 graphs for its 3 nets (safe to modify)."""
    return GlimpseModel.load(tiny_quantized_model_path, "cpu")


def random_stages(model: GlimpseModel) -> GlimpseModel:
    """``model`` with random (fixed) coarse and fine nets: answers that move with every option."""
    model.coarse = randomise_weights(CoarseNet(CoarseConfig(**TINY_COARSE_CONFIG)), seed=3)
    model.fine = randomise_weights(FineNet(FineConfig(**TINY_FINE_CONFIG)), seed=4)
    model.meta["iterations"] = 0
    return model


def predict(model: GlimpseModel, image, **kw):
    """``model.predict`` read as the training images face, at the model's spacing (no warnings)."""
    return model.predict(image, facing="right", spacing=model.pixel_spacing, **kw)


def all_runtimes(model: GlimpseModel) -> list[NetRuntime]:
    return [rt for rts in model.runtimes.values() for rt in rts]


def dict_keys(net: torch.nn.Module) -> list[set]:
    """Every module's own attribute names (its ``__dict__``), module by module."""
    return [set(m.__dict__) for m in net.modules()]


def fresh_like(net: torch.nn.Module) -> torch.nn.Module:
    """A newly made net of ``net``'s class and configuration."""
    return type(net)(net.cfg)


# ------------------------------------------------------------------------------ the stages
def test_a_staged_model_is_coarse_fine_glimpse_and_a_glimpse_only_one_glimpse(staged, tiny_model):
    stages = staged.stages
    assert tuple(type(s) for s in stages) == (CoarseStage, FineStage, GlimpseStage)
    assert [s.name for s in stages] == ["coarse", "fine", "glimpse"]
    coarse, fine, glimpse = stages
    assert coarse.net is staged.coarse and coarse.nets == [staged.coarse] and len(coarse.runtimes) == 1
    assert fine.net is staged.fine and isinstance(fine.net, FineEnsemble)
    assert fine.nets == list(staged.fine.members) and len(fine.nets) == 2
    assert [rt.net for rt in fine.runtimes] == fine.nets
    assert glimpse.net is staged.net and glimpse.nets == [staged.net]
    assert staged.stages[0] is coarse and staged.stages[1] is fine  # the same objects, call after call
    assert list(staged.runtimes) == ["coarse", "fine"]
    assert [len(r) for r in staged.runtimes.values()] == [1, 2]

    assert tiny_model.coarse is None and tiny_model.fine is None
    assert tuple(type(s) for s in tiny_model.stages) == (GlimpseStage,)
    assert tiny_model.stages[0].net is tiny_model.net
    assert tiny_model.runtimes == {} and tiny_model.int8_nets == (0, 0)

    # dropping the fine stage leaves coarse, glimpse; a new glimpse net is a new glimpse stage
    staged.fine = None
    assert tuple(type(s) for s in staged.stages) == (CoarseStage, GlimpseStage)
    assert staged.int8_nets == (0, 1) and staged.fine_steps == 0
    old = staged.stages[-1]
    staged.net = tiny_model.net
    assert staged.stages[-1] is not old and staged.stages[-1].net is tiny_model.net


def test_the_stages_specs_follow_the_meta(staged, image):
    coarse, fine, glimpse = staged.stages
    assert staged.meta["iterations"] == 0  # conftest: the coarse and fine stages' answer
    assert coarse.spec == CoarseSpec() and fine.spec == FineSpec() and glimpse.spec == GlimpseSpec(iterations=0)
    one = predict(staged, image, record_stages=True)
    assert one.positions.shape == (1, 3, 2) and one.fine_positions.shape == (1, 3, 2)

    staged.meta.update(fine_steps=2, coarse_flip_average=True, iterations=4, coarse_decode_window=3,
                       fine_decode_window=1, research=False, coarse_blend=0.5)
    coarse, fine, glimpse = staged.stages
    assert coarse.spec == CoarseSpec(flip_average=True, decode_window=3)
    assert fine.spec == FineSpec(steps=2, decode_window=1, research=False)
    assert glimpse.spec == GlimpseSpec(iterations=4, blend=0.5)
    assert staged.spec == InferenceSpec(coarse.spec, fine.spec, glimpse.spec)
    assert (staged.fine_steps, staged.default_iterations) == (2, 4)
    assert (staged.coarse_decode_window, staged.fine_decode_window) == (3, 1)

    tr = predict(staged, image, record_stages=True)
    assert tr.fine_positions.shape == (2, 3, 2)  # two fine looks recorded
    assert tr.fine_windows.shape[0] == 2 and tr.fine_heatmaps.shape[0] == 2
    assert tr.positions.shape == (4 + 1, 3, 2)  # four glimpse steps by default
    assert predict(staged, image, iterations=0).positions.shape == (1, 3, 2)  # asked-for steps win


def test_the_coarse_spec_reaches_the_coarse_answer(tiny_model, image):
    """Random nets: the flip average and the decode window move the coarse answer, as a stage made
    with that spec by hand has it."""
    model = random_stages(tiny_model)
    pyr = model.pyramid(image)
    plain = predict(model, pyr, record_stages=True).coarse_positions
    np.testing.assert_array_equal(plain, CoarseStage(model.coarse).run(pyr)[0])
    model.meta["coarse_flip_average"] = True
    flipped = predict(model, pyr, record_stages=True).coarse_positions
    assert not np.allclose(flipped, plain, atol=1e-3)
    np.testing.assert_array_equal(flipped, CoarseStage(model.coarse, CoarseSpec(flip_average=True)).run(pyr)[0])
    model.meta["coarse_decode_window"] = 5
    wide = predict(model, pyr, record_stages=True).coarse_positions
    assert not np.allclose(wide, flipped, atol=1e-3)
    np.testing.assert_array_equal(wide, CoarseStage(model.coarse, CoarseSpec(True, 5)).run(pyr)[0])


# ------------------------------------------------------------------------ running by hand
@pytest.mark.parametrize("which", ["blobs", "random"])
def test_running_the_stages_by_hand_gives_predicts_answer(staged, tiny_model, image, which):
    """Coarse on the pyramid, fine from its answer, the glimpses from the fine answer: exactly
    what predict gives (no confidence, no site offsets, read as the training images face)."""
    model = staged if which == "blobs" else random_stages(tiny_model)
    assert "confidence" not in model.meta and "landmark_offsets_px" not in model.meta
    pyr = model.pyramid(image)
    coarse, fine, glimpse = model.stages
    pos, spread, disagreement = coarse.run(pyr)
    assert pos.shape == (3, 2) and spread.shape == disagreement.shape == (3,)
    looks: list = []
    fpos, fspread = fine.run(pyr, pos, looks=looks)
    assert len(looks) == fine.spec.steps == 1
    assert not np.allclose(fpos, pos, atol=1e-3)  # the fine stage moved the answer
    reach = fine.reach_px(model.pixel_spacing)
    fspread = np.where(disagreement > reach, np.maximum(fspread, disagreement), fspread)

    tr = predict(model, pyr, iterations=0, record_stages=True)
    np.testing.assert_array_equal(tr.final, fpos)
    np.testing.assert_array_equal(tr.uncertainty_mm, fspread * model.pixel_spacing)
    np.testing.assert_array_equal(tr.coarse_positions, pos)
    np.testing.assert_array_equal(tr.fine_positions[0], fpos)
    np.testing.assert_array_equal(tr.fine_heatmaps[0], looks[0].heatmaps)
    np.testing.assert_array_equal(model.locate_coarse(pyr)[0], fpos)
    np.testing.assert_array_equal(model.locate_coarse(pyr, fine_steps=0)[0], pos)

    steps = glimpse.run(pyr, fpos[None], np.arange(3), 2)
    assert steps.positions.shape == (3, 1, 3, 2)
    np.testing.assert_array_equal(steps.positions[0, 0], fpos)
    assert not np.allclose(steps.positions[-1, 0], fpos, atol=1e-3)  # the glimpses moved it
    np.testing.assert_array_equal(predict(model, pyr, iterations=2).positions, steps.positions[:, 0])


def test_the_glimpse_stage_alone_is_a_glimpse_only_models_prediction(tiny_model, image):
    pyr = tiny_model.pyramid(image)
    (glimpse,) = tiny_model.stages
    start = tiny_model.mean_start
    if "train_image_shape" in tiny_model.meta:
        th, tw = tiny_model.meta["train_image_shape"]
        start = start * np.array([pyr.shape[1] / tw, pyr.shape[0] / th])
    steps = glimpse.run(pyr, start[None], np.arange(3), 3)
    tr = predict(tiny_model, pyr, iterations=3)
    np.testing.assert_array_equal(tr.positions, steps.positions[:, 0])
    assert glimpse.spec.iterations == tiny_model.default_iterations


# ---------------------------------------------------------------------- int8 in the stages
def test_int8_graphs_live_in_the_stage_runtimes_not_on_the_nets(quantized, image, monkeypatch):
    ran = []
    call = Int8Backend.__call__
    monkeypatch.setattr(Int8Backend, "__call__", lambda self, x: ran.append(self) or call(self, x))
    assert Int8Net is Int8Backend
    assert quantized.int8_nets == (N_NETS, N_NETS)
    rts = all_runtimes(quantized)
    assert len(rts) == N_NETS
    for rt in rts:
        assert isinstance(rt.int8, Int8Backend)
        assert rt.graph() is rt.int8 and rt.usable() is rt.int8 and rt.backend() is rt.int8
        assert rt.int8.key == weights_key(rt.net)
        assert not isinstance(rt.backend(int8=False), Int8Backend)
    predict(quantized, image, iterations=1)  # sessions and float copies made, the glimpse net run
    assert {id(q) for q in ran} == {id(rt.int8) for rt in rts}
    nets = [n for st in quantized.stages for n in st.nets]
    assert len(nets) == N_NETS + 1
    for net in nets:  # nothing added to any module of any net
        assert dict_keys(net) == dict_keys(fresh_like(net)), type(net).__name__

    # a new fine net is a new fine stage, without graphs; the coarse stage keeps its own
    coarse_rt = quantized.stages[0].runtimes[0]
    old_fine = quantized.fine
    old_stage = quantized.stages[1]
    other = FineNet(FineConfig(**TINY_FINE_CONFIG)).eval()
    quantized.fine = other
    fine = quantized.stages[1]
    assert isinstance(fine, FineStage) and fine is not old_stage and fine.nets == [other]
    assert all(rt.graph() is None and rt.usable() is None for rt in fine.runtimes)
    assert not isinstance(fine.runtimes[0].backend(), Int8Backend)
    assert quantized.stages[0].runtimes[0] is coarse_rt and coarse_rt.graph() is not None
    assert quantized.int8_nets == (1, 2)
    # the graphs were the old stage's, not its nets': giving the model its old nets back gives no graphs
    quantized.fine = old_fine
    assert quantized.int8_nets == (1, N_NETS)
    assert all(rt.graph() is None for rt in quantized.stages[1].runtimes)
    quantized.coarse = quantized.coarse
    assert quantized.int8_nets == (0, N_NETS)
    ran.clear()
    predict(quantized, image, iterations=0)
    assert not ran


def test_a_weight_change_drops_that_nets_graph_and_makes_a_new_float_copy(quantized, image):
    coarse_rt, fine0, fine1 = all_runtimes(quantized)
    x = torch.rand(3, TINY_FINE_CONFIG["context"], 32, 32) * 255
    fused = fine1.torch.module()
    assert fine1.backend(int8=False) is fused
    graph = fine1.int8.graph
    with torch.no_grad():  # as a fine-tuning step would
        next(fine1.net.parameters()).add_(0.01)
    assert fine1.graph() is None and fine1.int8 is None  # dropped, for good
    assert fine1.usable() is None
    new = fine1.backend()
    assert not isinstance(new, Int8Backend) and new is not fused and new is fine1.torch.module()
    with torch.inference_mode():
        torch.testing.assert_close(new(x), fine1.net(x), atol=1e-4, rtol=1e-4)
        assert not torch.allclose(fused(x), new(x))
    assert fine0.graph() is not None and coarse_rt.graph() is not None  # the others keep theirs
    assert quantized.int8_nets == (N_NETS - 1, N_NETS)
    assert quantized.use_int8(True) == (N_NETS - 1, N_NETS)

    # a graph given for the new weights is used again; loading weights (the same values) drops it
    fine1.give_graph(graph)  # (the bookkeeping: this graph was made from the weights before)
    assert fine1.graph().key == weights_key(fine1.net) and isinstance(fine1.backend(), Int8Backend)
    assert quantized.int8_nets == (N_NETS, N_NETS)
    fine1.net.load_state_dict(fine1.net.state_dict())
    assert fine1.graph() is None and quantized.int8_nets == (N_NETS - 1, N_NETS)
    # disabled graphs stay, unused
    assert quantized.use_int8(False) == (0, N_NETS)
    assert coarse_rt.graph() is not None and not coarse_rt.graph().enabled
    assert coarse_rt.usable() is None and not isinstance(coarse_rt.backend(), Int8Backend)
    assert isinstance(coarse_rt.backend(), torch.nn.Module)


def test_the_torch_backend_is_the_net_itself_in_training_mode(quantized):
    rt = all_runtimes(quantized)[0]
    rt.net.train()
    assert rt.backend() is rt.net and rt.backend(int8=False) is rt.net
    rt.net.eval()
    assert isinstance(rt.backend(), Int8Backend)


# ------------------------------------------------------------------------------ the spec
def test_inference_spec_of_an_empty_meta_is_the_defaults():
    spec = InferenceSpec.of_meta({})
    assert spec == InferenceSpec()
    assert spec.coarse == CoarseSpec(flip_average=False, decode_window=2)
    assert spec.fine == FineSpec(steps=1, decode_window=2, research=True)
    assert spec.glimpse == GlimpseSpec(iterations=3, blend=0.0, gate=None)
    # keys it does not read change nothing
    assert InferenceSpec.of_meta({"confidence": {"a": 1}, "landmark_offsets_px": [[1, 2]], "int8": {}}) == spec


@pytest.mark.parametrize("key,value,stage,field,expect", [
    ("coarse_flip_average", True, "coarse", "flip_average", True),
    ("coarse_flip_average", 1, "coarse", "flip_average", True),
    ("coarse_decode_window", 10, "coarse", "decode_window", 10),
    ("fine_steps", 0, "fine", "steps", 0),
    ("fine_steps", np.int64(3), "fine", "steps", 3),
    ("fine_decode_window", 7, "fine", "decode_window", 7),
    ("research", False, "fine", "research", False),
    ("iterations", 5, "glimpse", "iterations", 5),
    ("iterations", 0, "glimpse", "iterations", 0),
    ("coarse_blend", 0.25, "glimpse", "blend", 0.25),
    ("glimpse_gate", {"apply": [True, False, True]}, "glimpse", "gate", (True, False, True)),
    ("glimpse_gate", {"apply": [[1], [0], [0]], "fitted_on": 20}, "glimpse", "gate", (True, False, False)),
])
def test_inference_spec_reads_each_key(key, value, stage, field, expect):
    spec = InferenceSpec.of_meta({key: value})
    got = getattr(getattr(spec, stage), field)
    assert got == expect and type(got) is type(expect)
    if field == "gate":
        assert all(type(v) is bool for v in got)
    # that field alone differs from the defaults
    default = InferenceSpec()
    assert spec == replace(default, **{stage: replace(getattr(default, stage), **{field: expect})})


def test_the_model_reads_its_spec_from_its_meta_now(staged):
    assert staged.spec == InferenceSpec.of_meta(staged.meta)
    staged.meta["glimpse_gate"] = {"apply": [True, False, True]}
    assert staged.spec.glimpse.gate == (True, False, True)
    np.testing.assert_array_equal(staged.glimpse_gate, [True, False, True])
    assert staged.stages[-1].spec.gate == (True, False, True)
    del staged.meta["glimpse_gate"]
    assert staged.glimpse_gate is None and staged.stages[-1].spec.gate is None
