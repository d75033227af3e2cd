"""Int8 inference (napari_glimpse.int8): quantizing the coarse and fine nets, the int8 answers
against the float ones, switching, the graphs in checkpoints, falling back to the float nets
(changed weights, no ONNX Runtime), the errors, and the shipped default model's graphs.

The tiny models' coarse and fine nets have hand-set weights that find a bright disc
(conftest.blob_finder), so their answers are well posed and int8's can be compared with the
float ones in pixels; the nets' raw outputs are compared on random weights as well."""

from __future__ import annotations

import copy
import sys

import numpy as np
import pytest
import torch
from conftest import TINY_COARSE_CONFIG, TINY_FINE_CONFIG, randomise_weights, synthetic_image

from napari_glimpse import int8
from napari_glimpse.checkpoint import read_checkpoint
from napari_glimpse.coarse import CoarseConfig, CoarseNet, members_of
from napari_glimpse.errors import GlimpseError
from napari_glimpse.fine import FineConfig, FineEnsemble, FineNet
from napari_glimpse.inference import DEFAULT_MODEL, GlimpseModel
from napari_glimpse.int8 import Int8Net, checkpoint_graphs, quantize
from napari_glimpse.io import read_image
from napari_glimpse.runtime import NetRuntime

N_NETS = 3  # the tiny models': 1 coarse + 2 fine
# int8 against float, pixels of the 256 x 256 synthetic images. Observed on 30 disc images: at
# most 0.46 px (the fine heatmap's peak moving to the next pixel), typically below 0.02 px.
MAX_MOVE_PX = 1.0
TYPICAL_MOVE_PX = 0.05
# a net's int8 output against its float output, as a fraction of the float output's range
# (observed 0.2-1 % on random weights)
MAX_OUTPUT_ERROR = 0.03


def nets_of(model: GlimpseModel) -> list:
    return members_of(model.coarse) + members_of(model.fine)


def runtimes_of_model(model: GlimpseModel) -> list[NetRuntime]:
    """The coarse and fine stages' runtimes, in the order of :func:`nets_of` (one per net)."""
    by_stage = model.runtimes
    rts = [rt for name in ("coarse", "fine") for rt in by_stage.get(name, [])]
    assert [rt.net for rt in rts] == nets_of(model)
    return rts


def runtime_of(model: GlimpseModel, net) -> NetRuntime:
    """The runtime of one of the model's nets (its stage's)."""
    (rt,) = [rt for rt in runtimes_of_model(model) if rt.net is net]
    return rt


def inference_net(model: GlimpseModel, net, int8: bool = True):
    """What runs ``net`` in the model's inference now (its runtime's backend)."""
    return runtime_of(model, net).backend(int8)


def finals(model: GlimpseModel, images) -> np.ndarray:
    return np.stack([model.predict(im).final for im in images])


@pytest.fixture
def graph_runs(monkeypatch):
    """Every int8 graph run from now on: ``(the Int8Net, its input, its output)``."""
    runs = []
    call = Int8Net.__call__

    def spy(self, x):
        out = call(self, x)
        runs.append((self, x.clone(), out))
        return out

    monkeypatch.setattr(Int8Net, "__call__", spy)
    return runs


def graphs_run(runs) -> set[int]:
    return {id(q) for q, _, _ in runs}


def graphs_of_nets(model: GlimpseModel, nets) -> set[int]:
    """The int8 graphs inference uses for the model's ``nets`` (each must have one)."""
    graphs = [inference_net(model, n) for n in nets]
    assert all(isinstance(g, Int8Net) for g in graphs)
    return {id(g) for g in graphs}


@pytest.fixture(scope="module")
def discs():
    """Six 256 x 256 images with one bright disc each (landmark 0's blob) and the discs' centres."""
    rng = np.random.default_rng(1)
    centres = np.array([[80.0, 80.0]]) + rng.uniform(-40, 40, size=(6, 2))
    return [synthetic_image(c[None], rng) for c in centres], centres


@pytest.fixture(scope="module")
def test_images(tiny_data):
    return [read_image(p) for p in tiny_data["test1"]["paths"]]


@pytest.fixture(scope="module")
def float_answers(tiny_quantized_model_path, test_images):
    """The float nets' answers on the test images (the model loaded with int8=False)."""
    model = GlimpseModel.load(tiny_quantized_model_path, "cpu", int8=False)
    assert model.int8_nets == (0, N_NETS)
    return finals(model, test_images)


# ---------------------------------------------------------------------------- quantizing
def test_quantize_runs_int8_graphs_that_answer_like_the_float_nets(tiny_staged_model_path, discs, graph_runs):
    images, centres = discs
    model = GlimpseModel.load(tiny_staged_model_path, "cpu")
    assert model.int8_nets == (0, N_NETS)  # no graphs yet
    floats = finals(model, images)
    # the float answers are well posed: every landmark on its image's disc
    assert np.linalg.norm(floats - centres[:, None], axis=-1).max() < 4.0
    assert not graph_runs

    reports = []
    assert quantize(model, images[:2], progress=lambda *a: reports.append(a)) == N_NETS
    assert model.int8_nets == (N_NETS, N_NETS)
    assert reports[:2] == [("images", 1, 2), ("images", 2, 2)]
    assert reports[-1] == ("nets", N_NETS, N_NETS)

    graph_runs.clear()
    q = finals(model, images)
    assert graphs_run(graph_runs) == graphs_of_nets(model, nets_of(model))  # every net ran its int8 graph
    move = np.linalg.norm(q - floats, axis=-1)  # (images, landmarks), the calibration images and others
    assert move.max() <= MAX_MOVE_PX, move
    assert np.median(move) <= TYPICAL_MOVE_PX, move


def test_int8_outputs_follow_the_float_nets_on_random_weights(tiny_model, tiny_data, test_images, graph_runs):
    """Every weight of every layer in use: each graph's logits, on the inputs inference gives
    it, are those of its own float net to within a few percent of their range."""
    model = tiny_model
    model.coarse = randomise_weights(CoarseNet(CoarseConfig(**TINY_COARSE_CONFIG)), seed=3)
    fine = FineConfig(**TINY_FINE_CONFIG)
    model.fine = FineEnsemble([randomise_weights(FineNet(fine), seed=4), randomise_weights(FineNet(fine), seed=5)])
    model.meta["iterations"] = 0
    assert quantize(model, tiny_data["train"]["paths"][:2]) == N_NETS
    graph_runs.clear()
    for im in test_images:
        model.predict(im)
    rts = {id(rt.backend()): rt for rt in runtimes_of_model(model)}
    assert graphs_run(graph_runs) == set(rts) and len(rts) == N_NETS
    for q, x, out in graph_runs:
        with torch.inference_mode():
            ref = rts[id(q)].backend(int8=False)(x)
        assert ref is not out and not isinstance(rts[id(q)].backend(int8=False), Int8Net)
        assert out.shape == ref.shape
        err = float((out - ref).abs().max() / (ref.max() - ref.min()))
        assert err <= MAX_OUTPUT_ERROR, err


def test_quantizing_only_the_fine_stage_leaves_the_coarse_net_float(tiny_quantized_model_path, tiny_data, test_images,
                                                                     float_answers, graph_runs, tmp_path):
    """``which=("fine",)``: the fine nets get graphs, the coarse net loses its own and runs float,
    and the file says so (a ``None`` graph for it)."""
    model = GlimpseModel.load(tiny_quantized_model_path, "cpu")
    coarse_net, *fine_nets = nets_of(model)
    assert quantize(model, tiny_data["train"]["paths"][:2], which=("fine",)) == N_NETS - 1
    assert model.int8_nets == (N_NETS - 1, N_NETS)
    assert not isinstance(inference_net(model, coarse_net), Int8Net)
    graph_runs.clear()
    q = finals(model, test_images)
    assert graphs_run(graph_runs) == graphs_of_nets(model, fine_nets)
    assert np.linalg.norm(q - float_answers, axis=-1).max() <= MAX_MOVE_PX
    model.save(tmp_path / "fine_only.pt")
    graphs = checkpoint_graphs(read_checkpoint(tmp_path / "fine_only.pt"))
    assert graphs["coarse"] == [None] and all(g is not None for g in graphs["fine"])
    assert GlimpseModel.load(tmp_path / "fine_only.pt", "cpu").int8_nets == (N_NETS - 1, N_NETS)
    assert model.meta["int8"] == {"stages": ["fine"], "float_ends": False, "calibration_images": 2}
    assert quantize(model, tiny_data["train"]["paths"][:1], which="coarse") == 1  # a stage's name alone
    assert model.int8_nets == (1, N_NETS) and isinstance(inference_net(model, coarse_net), Int8Net)
    with pytest.raises(GlimpseError, match="coarse and/or fine"):
        quantize(model, tiny_data["train"]["paths"][:1], which=("glimpse",))
    model.fine = None  # a stage the model does not have: an error, and the graphs stay
    with pytest.raises(GlimpseError, match="no fine stage"):
        quantize(model, tiny_data["train"]["paths"][:1], which=("fine",))
    assert model.int8_nets == (1, 1)
    with pytest.raises(GlimpseError, match="coarse and/or fine"):
        quantize(model, tiny_data["train"]["paths"][:1], which=())


def test_float_ends_keep_the_first_and_last_convolution_float(tiny_staged_model_path):
    """``float_ends``: the first and the last convolution read float weights and inputs, and the
    logits are not stepped to uint8; the convolutions between stay int8. By default all are int8."""
    onnx = pytest.importorskip("onnx")
    net = members_of(GlimpseModel.load(tiny_staged_model_path, "cpu").fine)[0]
    x = np.random.default_rng(0).uniform(0, 255, (4, TINY_FINE_CONFIG["context"], 32, 32)).astype(np.float32)

    def layout(graph: bytes) -> dict:
        g = onnx.load_from_string(graph).graph
        made_by = {out: n for n in g.node for out in n.output}
        convs = [n for n in g.node if n.op_type == "Conv"]

        def op(tensor: str) -> str | None:  # the op that makes it (None: an initializer or input)
            n = made_by.get(tensor)
            return None if n is None else n.op_type

        logits = made_by[g.output[0].name]
        while logits.op_type == "Cast":
            logits = made_by[logits.input[0]]
        return {"convs": len(convs), "weights": [op(c.input[1]) for c in convs], "input": op(convs[0].input[0]),
                "logits": logits.op_type}

    plain = layout(int8.quantize_net(net, [x]))
    ends = layout(int8.quantize_net(net, [x], float_ends=True))
    assert plain["convs"] == ends["convs"] > 2
    assert plain["weights"] == ["DequantizeLinear"] * plain["convs"]
    assert plain["input"] == "DequantizeLinear" and plain["logits"] == "DequantizeLinear"
    assert ends["weights"] == [None] + ["DequantizeLinear"] * (ends["convs"] - 2) + [None]
    assert ends["input"] != "DequantizeLinear" and ends["logits"] == "Conv"

# ----------------------------------------------------------------------------- switching
def test_use_int8_switches_between_the_float_and_the_int8_answers(tiny_quantized_model_path, test_images,
                                                                  float_answers, graph_runs):
    model = GlimpseModel.load(tiny_quantized_model_path, "cpu")
    assert model.int8_nets == (N_NETS, N_NETS)
    q = finals(model, test_images)
    assert graphs_run(graph_runs) == graphs_of_nets(model, nets_of(model))

    assert model.use_int8(False) == (0, N_NETS)
    assert model.int8_nets == (0, N_NETS)
    graph_runs.clear()
    np.testing.assert_array_equal(finals(model, test_images), float_answers)
    assert not graph_runs

    assert model.use_int8(True) == (N_NETS, N_NETS)
    np.testing.assert_array_equal(finals(model, test_images), q)
    assert graph_runs

    # a model loaded with int8=False has the graphs too, off
    off = GlimpseModel.load(tiny_quantized_model_path, "cpu", int8=False)
    assert off.use_int8(True) == (N_NETS, N_NETS)
    np.testing.assert_array_equal(finals(off, test_images), q)


# -------------------------------------------------------------------------------- files
def test_graphs_are_stored_compressed_and_older_files_still_load(tiny_quantized_model_path, test_images, tmp_path):
    """Files keep the graphs zlib-compressed under ``int8_zlib`` (older readers, which know only
    ``int8``, run the float nets); a file written before, with raw graphs under ``int8``, still
    runs them, with the same answers; a damaged graph is a clear error."""
    ck = read_checkpoint(tiny_quantized_model_path)
    assert "int8" not in ck and ck["int8_zlib"] is not None
    raw = checkpoint_graphs(ck)
    stored = sum(g.numel() for gs in ck["int8_zlib"].values() for g in gs if g is not None)
    assert stored < sum(g.numel() for gs in raw.values() for g in gs if g is not None)
    q = finals(GlimpseModel.load(tiny_quantized_model_path, "cpu"), test_images)
    old = {k: v for k, v in ck.items() if k != "int8_zlib"}
    old["int8"] = raw
    torch.save(old, tmp_path / "old.pt")
    loaded = GlimpseModel.load(tmp_path / "old.pt", "cpu")
    assert loaded.int8_nets == (N_NETS, N_NETS)
    np.testing.assert_array_equal(finals(loaded, test_images), q)
    bad = dict(ck, int8_zlib={name: [None if g is None else g[: g.numel() // 2] for g in gs]
                              for name, gs in ck["int8_zlib"].items()})
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(GlimpseError, match="bad.pt: the checkpoint's int8 graphs are damaged"):
        GlimpseModel.load(tmp_path / "bad.pt", "cpu")


def test_saving_and_loading_keeps_the_graphs(tiny_quantized_model_path, test_images, tmp_path):
    model = GlimpseModel.load(tiny_quantized_model_path, "cpu")
    q = finals(model, test_images)
    model.save(tmp_path / "again.pt")
    graphs = checkpoint_graphs(read_checkpoint(tiny_quantized_model_path))
    again = checkpoint_graphs(read_checkpoint(tmp_path / "again.pt"))
    assert sorted(again) == ["coarse", "fine"] and len(again["coarse"]) == 1 and len(again["fine"]) == 2
    for name in again:
        for a, b in zip(again[name], graphs[name]):
            assert a.dtype == torch.uint8 and torch.equal(a, b)
    loaded = GlimpseModel.load(tmp_path / "again.pt", "cpu")
    assert loaded.int8_nets == (N_NETS, N_NETS)
    np.testing.assert_array_equal(finals(loaded, test_images), q)

    # loaded with int8=False: the graphs are there, off, and saved along
    off = GlimpseModel.load(tiny_quantized_model_path, "cpu", int8=False)
    assert off.int8_nets == (0, N_NETS)
    off.save(tmp_path / "off.pt")
    back = GlimpseModel.load(tmp_path / "off.pt", "cpu")
    assert back.int8_nets == (N_NETS, N_NETS)
    np.testing.assert_array_equal(finals(back, test_images), q)


def test_changed_weights_drop_that_nets_graph(tiny_quantized_model_path, test_images, float_answers, graph_runs,
                                              tmp_path):
    model = GlimpseModel.load(tiny_quantized_model_path, "cpu")
    coarse, fine0, fine1 = nets_of(model)
    with torch.no_grad():  # as a fine-tuning step would
        next(fine1.parameters()).add_(0.01)
    assert model.int8_nets == (N_NETS - 1, N_NETS)
    assert model.use_int8(True) == (N_NETS - 1, N_NETS)  # not back
    assert not isinstance(inference_net(model, fine1), Int8Net)
    finals(model, test_images)
    assert graphs_run(graph_runs) == graphs_of_nets(model, [coarse, fine0])

    model.save(tmp_path / "tuned.pt")
    graphs = checkpoint_graphs(read_checkpoint(tmp_path / "tuned.pt"))
    assert graphs["fine"][1] is None
    assert graphs["coarse"][0] is not None and graphs["fine"][0] is not None
    assert GlimpseModel.load(tmp_path / "tuned.pt", "cpu").int8_nets == (N_NETS - 1, N_NETS)

    # weights loaded into a net, even the same values, are new weights too
    coarse.load_state_dict(coarse.state_dict())
    assert model.int8_nets == (N_NETS - 2, N_NETS)
    # with no graph left, the checkpoint has no int8 entry
    with torch.no_grad():
        next(fine0.parameters()).add_(0.01)
    assert model.int8_nets == (0, N_NETS)
    assert "int8" not in model.to_checkpoint()


def test_without_onnxruntime_the_float_nets_run(tiny_quantized_model_path, test_images, float_answers, graph_runs,
                                                monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime fails
    int8.available.cache_clear()
    try:
        assert not int8.available()
        model = GlimpseModel.load(tiny_quantized_model_path, "cpu")
        assert model.int8_nets == (0, N_NETS)
        assert model.use_int8(True) == (0, N_NETS)
        np.testing.assert_array_equal(finals(model, test_images), float_answers)
        assert not graph_runs
        # the graphs are kept for machines that have it
        model.save(tmp_path / "kept.pt")
        assert [g is not None
                for gs in checkpoint_graphs(read_checkpoint(tmp_path / "kept.pt")).values()
                for g in gs] == [True] * N_NETS
    finally:
        int8.available.cache_clear()


# -------------------------------------------------------------------------------- errors
def test_quantize_without_onnx_says_what_to_install(tiny_staged_model_path, tiny_data, monkeypatch):
    model = GlimpseModel.load(tiny_staged_model_path, "cpu")
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx fails
    with pytest.raises(GlimpseError, match=r"napari-glimpse\[quantize\]") as ei:
        quantize(model, tiny_data["train"]["paths"][:1])
    assert "onnx" in str(ei.value).replace("napari-glimpse[quantize]", "")
    assert model.int8_nets == (0, N_NETS)


def test_quantize_needs_a_coarse_stage_and_images(tiny_model, tiny_staged_model_path, tiny_data):
    assert tiny_model.coarse is None
    with pytest.raises(GlimpseError, match="coarse"):
        quantize(tiny_model, tiny_data["train"]["paths"][:1])
    assert tiny_model.int8_nets == (0, 0)
    model = GlimpseModel.load(tiny_staged_model_path, "cpu")
    with pytest.raises(GlimpseError, match="image"):
        quantize(model, [])
    assert model.int8_nets == (0, N_NETS)


# ---------------------------------------------------------------------------- copies
def test_deep_copies_of_quantized_nets(tiny_quantized_model_path, test_images):
    """ONNX Runtime sessions cannot be copied: copies leave them behind (and the original keeps
    running its graphs)."""
    model = GlimpseModel.load(tiny_quantized_model_path, "cpu")
    q = finals(model, test_images)  # the sessions exist now
    for rt in runtimes_of_model(model):
        assert rt.int8._session is not None
        twin = copy.deepcopy(rt)
        assert twin.net is not rt.net and twin.torch.net is twin.net
        assert [torch.equal(a, b) for a, b in zip(twin.net.parameters(), rt.net.parameters())] == \
            [True] * len(list(rt.net.parameters()))
        assert twin.int8 is not None and twin.int8._session is None and twin.int8.graph == rt.int8.graph
        assert rt.int8._session is not None  # the original keeps its own
    twin_model = copy.deepcopy(model)
    move = np.linalg.norm(finals(twin_model, test_images) - q, axis=-1)
    assert move.max() <= MAX_MOVE_PX
    assert model.int8_nets == (N_NETS, N_NETS)
    np.testing.assert_array_equal(finals(model, test_images), q)


# ------------------------------------------------------------------ the shipped default
def test_the_default_model_runs_int8_graphs_for_its_five_nets(graph_runs):
    model = GlimpseModel.load(None, "cpu")
    assert model.int8_nets == (5, 5)
    nets = nets_of(model)
    assert len(members_of(model.coarse)) == 1 and len(members_of(model.fine)) == 4
    img = synthetic_image(np.array([[150.0, 150.0]]), np.random.default_rng(0), 300)
    tr = model.predict(img, iterations=0)
    assert tr.final.shape == (19, 2)
    assert graphs_run(graph_runs) == graphs_of_nets(model, nets)
    assert GlimpseModel.load(None, "cpu", int8=False).int8_nets == (0, 5)
    # the graphs sit beside the float weights, and the file stays small
    assert DEFAULT_MODEL.stat().st_size <= 20 * 10**6



def test_a_failed_quantize_leaves_the_graphs_as_they_were(tiny_quantized_model_path, test_images, monkeypatch):
    model = GlimpseModel.load(tiny_quantized_model_path, "cpu")
    before = [rt.graph().graph for rt in runtimes_of_model(model)]
    answers = finals(model, test_images)
    made = []

    def fail_on_the_second(net, inputs, float_ends=False):
        made.append(net)
        if len(made) == 2:
            raise RuntimeError("disk full")
        return b"not a graph"

    monkeypatch.setattr(int8, "quantize_net", fail_on_the_second)
    for which in (("coarse", "fine"), ("fine",)):  # a failure leaves the coarse graph too
        made.clear()
        with pytest.raises(RuntimeError, match="disk full"):
            quantize(model, test_images[:1], which=which)
        # no net got a new graph, and the old ones are used as before (not left disabled)
        assert [rt.graph().graph for rt in runtimes_of_model(model)] == before
        assert model.int8_nets == (3, 3)
        np.testing.assert_array_equal(finals(model, test_images), answers)


def test_record_inputs_gives_every_net_what_it_reads(tiny_staged_model_path, test_images):
    """What calibration sees: one input per image for each coarse net (the 19-landmark view) and
    one batch of windows per image for each fine net, the same for every member of an ensemble."""
    model = GlimpseModel.load(tiny_staged_model_path, "cpu")
    steps = []
    seen = int8.record_inputs(model, test_images[:2], steps.append)
    assert steps == [1, 2]
    coarse, fine = members_of(model.coarse), members_of(model.fine)
    assert set(seen) == {id(n) for n in coarse + fine}
    for n in coarse:
        assert len(seen[id(n)]) == 2 and all(x.shape[:2] == (1, 1) for x in seen[id(n)])
    for n in fine:
        assert len(seen[id(n)]) == 2
        assert all(x.shape == (n.cfg.n_landmarks, n.cfg.context, n.cfg.patch, n.cfg.patch) for x in seen[id(n)])
    for a, b in zip(seen[id(fine[0])], seen[id(fine[1])], strict=True):
        np.testing.assert_array_equal(a, b)  # the ensemble's nets read the same windows
