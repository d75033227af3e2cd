"""Checkpoints: round trip, and clear errors for files that are not (compatible) models."""

import numpy as np
import pytest
import torch

from napari_glimpse.checkpoint import FORMAT_VERSION, KIND, atomic_torch_save, read_checkpoint
from napari_glimpse.errors import GlimpseError
from napari_glimpse.inference import GlimpseModel


@pytest.fixture
def test_image(tiny_data):
    from napari_glimpse.io import read_image

    return read_image(tiny_data["test1"]["paths"][0])


def test_round_trip_gives_identical_predictions(tiny_model, tmp_path, test_image):
    p = tmp_path / "copy.pt"
    tiny_model.save(p)
    loaded = GlimpseModel.load(p, device="cpu")
    a = tiny_model.predict(test_image, iterations=3)
    b = loaded.predict(test_image, iterations=3)
    np.testing.assert_array_equal(a.positions, b.positions)
    np.testing.assert_array_equal(a.uncertainty_mm, b.uncertainty_mm)
    assert loaded.config == tiny_model.config
    assert loaded.landmark_names == tiny_model.landmark_names == ("L1", "L2", "L3")
    assert loaded.pixel_spacing == tiny_model.pixel_spacing
    np.testing.assert_array_equal(loaded.mean_start, tiny_model.mean_start)
    np.testing.assert_array_equal(loaded.std_start, tiny_model.std_start)
    assert loaded.train_config == tiny_model.train_config
    assert loaded.meta["train_image_shape"] == [256, 256]
    for k, v in tiny_model.net.state_dict().items():
        assert torch.equal(v, loaded.net.state_dict()[k]), k
    assert not loaded.net.training  # loaded for inference
    # and the weights matter: perturbing them changes the answer
    with torch.no_grad():
        loaded.net.nets[0].head_b.add_(0.05)
    c = loaded.predict(test_image, iterations=3)
    assert not np.allclose(c.positions[1:], a.positions[1:])


def test_checkpoint_contents(tiny_model_path):
    ck = read_checkpoint(tiny_model_path)
    assert ck["kind"] == KIND == "napari-glimpse-model"
    assert ck["format_version"] == 1 < FORMAT_VERSION  # no coarse stage: still readable by version-1 readers
    assert ck["model_config"]["n_landmarks"] == 3 and ck["model_config"]["n_levels"] == 3
    assert tuple(ck["mean_start"].shape) == (3, 2)
    # loadable with weights_only (no pickled code)
    torch.load(tiny_model_path, map_location="cpu", weights_only=True)


def test_atomic_save_leaves_no_temp_files(tmp_path):
    atomic_torch_save({"a": torch.zeros(2)}, tmp_path / "d" / "x.pt")
    assert [p.name for p in (tmp_path / "d").iterdir()] == ["x.pt"]


def _not_a_model(path):
    with pytest.raises(GlimpseError, match="not a napari-glimpse model"):
        GlimpseModel.load(path, device="cpu")
    with pytest.raises(GlimpseError, match="not a napari-glimpse model"):
        read_checkpoint(path)


def test_random_bytes_file(tmp_path):
    p = tmp_path / "random.pt"
    p.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    _not_a_model(p)


def test_text_file(tmp_path):
    p = tmp_path / "model.pt"
    p.write_text("this is a text file, not a model\n")
    _not_a_model(p)


def test_plain_state_dict(tmp_path, tiny_model):
    p = tmp_path / "sd.pt"
    torch.save(tiny_model.net.state_dict(), p)
    _not_a_model(p)
    torch.save({"kind": "something-else", "format_version": 1}, p)
    _not_a_model(p)
    torch.save([1, 2, 3], p)
    _not_a_model(p)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(GlimpseError, match="model file not found"):
        GlimpseModel.load(tmp_path / "nope.pt", device="cpu")
    with pytest.raises(GlimpseError, match="folder"):
        GlimpseModel.load(tmp_path, device="cpu")


def test_newer_format_version(tiny_model, tmp_path):
    ck = tiny_model.to_checkpoint()
    ck["format_version"] = FORMAT_VERSION + 1
    p = tmp_path / "future.pt"
    torch.save(ck, p)
    with pytest.raises(GlimpseError, match="newer") as ei:
        GlimpseModel.load(p, device="cpu")
    assert f"format {FORMAT_VERSION + 1}" in str(ei.value)


def test_missing_format_version_and_keys(tiny_model, tmp_path):
    ck = tiny_model.to_checkpoint()
    del ck["format_version"]
    torch.save(ck, tmp_path / "a.pt")
    with pytest.raises(GlimpseError, match="no format version"):
        read_checkpoint(tmp_path / "a.pt")
    ck = tiny_model.to_checkpoint()
    del ck["state_dict"]
    torch.save(ck, tmp_path / "b.pt")
    with pytest.raises(GlimpseError, match="state_dict"):
        read_checkpoint(tmp_path / "b.pt")


def test_weights_of_the_wrong_shape(tiny_model, tmp_path):
    ck = tiny_model.to_checkpoint()
    ck["model_config"] = dict(ck["model_config"], width=16)
    p = tmp_path / "wide.pt"
    torch.save(ck, p)
    with pytest.raises(GlimpseError, match="weights do not fit the model configuration") as ei:
        GlimpseModel.load(p, device="cpu")
    msg = str(ei.value)
    assert "\n" not in msg and "size mismatch" in msg


def test_bad_model_configuration(tiny_model, tmp_path):
    ck = tiny_model.to_checkpoint()
    ck["model_config"] = dict(ck["model_config"], trunk="transformer")
    torch.save(ck, tmp_path / "t.pt")
    with pytest.raises(GlimpseError, match="bad model configuration"):
        GlimpseModel.load(tmp_path / "t.pt", device="cpu")


def test_start_positions_must_match_landmarks(tiny_model, tmp_path):
    ck = tiny_model.to_checkpoint()
    ck["mean_start"] = torch.zeros(19, 2, dtype=torch.float64)
    torch.save(ck, tmp_path / "s.pt")
    with pytest.raises(GlimpseError, match="3 landmarks"):
        GlimpseModel.load(tmp_path / "s.pt", device="cpu")


def test_cuda_without_gpu_is_a_clear_error(tiny_model_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(GlimpseError, match="no CUDA GPU"):
        GlimpseModel.load(tiny_model_path, device="cuda")


def test_a_fine_stage_deeper_than_the_pyramid_loads_and_reads_the_levels_it_makes(tiny_staged_model_path, tiny_data,
                                                                                  tmp_path):
    """A fine net reads levels ``level .. level + context - 1``; those below the model's pyramid
    (a wide context window) are made when read, so such a model loads and predicts."""
    from napari_glimpse.fine import FineConfig, FineNet
    from napari_glimpse.io import read_image

    model = GlimpseModel.load(tiny_staged_model_path, device="cpu")
    n = model.config.n_levels
    model.fine = FineNet(FineConfig(n_landmarks=3, level=1, patch=16, width=4, context=n + 1)).eval()
    model.save(tmp_path / "f.pt")
    loaded = GlimpseModel.load(tmp_path / "f.pt", device="cpu")
    assert loaded.fine.cfg.context == n + 1
    t = loaded.predict(read_image(tiny_data["test1"]["paths"][0]), facing="right", record_stages=True)
    assert np.isfinite(t.positions).all()
    assert t.fine_windows.shape[2] == n + 1  # one window per context level, the made ones too
