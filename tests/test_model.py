"""The glimpse network: spatial-softmax integral features, output shapes, heatmaps, configs."""

import numpy as np
import pytest
import torch

from napari_glimpse.model import (
    CompactTrunk,
    GlimpseModelNet,
    ModelConfig,
    PaperTrunk,
    make_trunk,
    spatial_softmax_features,
)

SMALL = ModelConfig(n_landmarks=3, n_levels=3, width=4, hidden=(16, 8))


# ------------------------------------------------------------------ spatial softmax features
def test_single_peak_gives_its_cell_centre_and_value():
    a = torch.zeros(1, 1, 8, 8)
    a[0, 0, 2, 5] = 100.0  # row 2, column 5
    feat, hm = spatial_softmax_features(a)
    assert feat.shape == (1, 1, 3) and hm.shape == (1, 1, 8, 8)
    x, y, act = feat[0, 0].tolist()
    assert x == pytest.approx((5 + 0.5) / 8 * 2 - 1, abs=1e-5)  # 0.375
    assert y == pytest.approx((2 + 0.5) / 8 * 2 - 1, abs=1e-5)  # -0.375
    assert act == pytest.approx(100.0, abs=1e-3)
    assert float(hm[0, 0, 2, 5]) == pytest.approx(1.0, abs=1e-6)


def test_constant_map_gives_the_centre_and_the_constant():
    a = torch.full((2, 3, 8, 8), 4.25)
    feat, hm = spatial_softmax_features(a)
    torch.testing.assert_close(feat[..., 0], torch.zeros(2, 3), atol=1e-6, rtol=0)
    torch.testing.assert_close(feat[..., 1], torch.zeros(2, 3), atol=1e-6, rtol=0)
    torch.testing.assert_close(feat[..., 2], torch.full((2, 3), 4.25))
    torch.testing.assert_close(hm, torch.full((2, 3, 8, 8), 1 / 64))


def test_channels_and_non_square_maps_are_independent():
    a = torch.zeros(1, 2, 4, 6)  # h = 4, w = 6
    a[0, 0, 3, 0] = 50.0  # bottom-left
    a[0, 1, 0, 5] = 50.0  # top-right
    feat, _ = spatial_softmax_features(a)
    x0, y0, _ = feat[0, 0].tolist()
    x1, y1, _ = feat[0, 1].tolist()
    assert (x0, y0) == pytest.approx((0.5 / 6 * 2 - 1, 3.5 / 4 * 2 - 1), abs=1e-5)
    assert (x1, y1) == pytest.approx((5.5 / 6 * 2 - 1, 0.5 / 4 * 2 - 1), abs=1e-5)


def test_two_equal_peaks_average():
    a = torch.zeros(1, 1, 8, 8)
    a[0, 0, 1, 1] = 60.0
    a[0, 0, 5, 7] = 60.0
    feat, _ = spatial_softmax_features(a)
    x, y, act = feat[0, 0].tolist()
    xs = [(c + 0.5) / 8 * 2 - 1 for c in (1, 7)]
    ys = [(r + 0.5) / 8 * 2 - 1 for r in (1, 5)]
    assert x == pytest.approx(np.mean(xs), abs=1e-5)
    assert y == pytest.approx(np.mean(ys), abs=1e-5)
    assert act == pytest.approx(60.0, abs=1e-3)


def test_heatmaps_sum_to_one():
    a = torch.randn(3, 5, 8, 8, generator=torch.Generator().manual_seed(0)) * 3
    _, hm = spatial_softmax_features(a)
    torch.testing.assert_close(hm.sum(dim=(-1, -2)), torch.ones(3, 5))
    assert float(hm.min()) > 0


# -------------------------------------------------------------------------------- trunks
def test_compact_trunk_output_shape():
    t = CompactTrunk(4).eval()
    with torch.no_grad():
        y = t(torch.zeros(2, 1, 64, 64))
    assert y.shape == (2, 16, 8, 8)
    assert t.out_channels == 16


def test_paper_trunk_output_shape_and_names():
    t = PaperTrunk().eval()  # ResNet-34 up to layer3: built once here
    with torch.no_grad():
        y = t(torch.zeros(1, 1, 64, 64))
    assert y.shape == (1, 256, 8, 8)
    names = set(t.state_dict())
    # torchvision resnet34 naming, so ImageNet weights load directly
    for n in ("conv1.weight", "bn1.running_mean", "layer1.0.conv1.weight", "layer2.0.downsample.0.weight",
              "layer3.5.bn2.weight"):
        assert n in names
    assert not any(n.startswith(("layer4", "fc")) for n in names)
    assert t.conv1.weight.shape == (64, 1, 7, 7)


def test_paper_trunk_loads_a_local_3_channel_state_dict(tmp_path):
    t = PaperTrunk()
    sd = {k: v.clone() for k, v in t.state_dict().items()}
    sd["conv1.weight"] = torch.ones(64, 3, 7, 7)
    sd["fc.weight"] = torch.zeros(10, 512)  # ignored
    p = tmp_path / "resnet34.pth"
    torch.save(sd, p)
    t.load_imagenet(str(p))
    torch.testing.assert_close(t.conv1.weight, torch.full((64, 1, 7, 7), 3.0))


def test_unknown_trunk_and_mode_raise():
    with pytest.raises(ValueError, match="trunk"):
        make_trunk(ModelConfig(trunk="vgg"))
    with pytest.raises(ValueError, match="mode"):
        GlimpseModelNet(ModelConfig(mode="banana", n_levels=1, width=4, hidden=(8,)))


# -------------------------------------------------------------------------------- networks
def _patches(b, levels, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, levels, 64, 64, generator=g) * 255


@pytest.mark.parametrize("mode", ["shared", "per_landmark"])
def test_output_shapes(mode):
    torch.manual_seed(0)
    cfg = ModelConfig(mode=mode, n_landmarks=3, n_levels=3, width=4, hidden=(16, 8))
    net = GlimpseModelNet(cfg).eval()
    assert len(net.nets) == (1 if mode == "shared" else 3)
    x = _patches(5, 3)
    lm = torch.tensor([0, 2, 1, 2, 0])
    with torch.no_grad():
        out = net(x, lm)
        out2, hm = net(x, lm, heatmaps=True)
    assert out.shape == (5, 2)
    torch.testing.assert_close(out, out2)
    assert hm.shape == (5, 3, 16, 8, 8)  # (B, levels, channels = 4 * width, 8, 8)
    torch.testing.assert_close(hm.float().sum(dim=(-1, -2)), torch.ones(5, 3, 16), atol=1e-4, rtol=0)
    # first MLP layer takes 3 features per channel per level
    assert net.nets[0].fc[0].in_features == 3 * 16 * 3


def test_per_landmark_mode_routes_each_landmark_to_its_own_network():
    torch.manual_seed(0)
    cfg = ModelConfig(mode="per_landmark", n_landmarks=2, n_levels=1, width=4, hidden=(8,))
    net = GlimpseModelNet(cfg).eval()
    with torch.no_grad():
        net.nets[0].head_b.fill_(1.0)
        net.nets[1].head_b.fill_(-1.0)
        net.nets[0].head_w.zero_()
        net.nets[1].head_w.zero_()
        out = net(_patches(4, 1), torch.tensor([1, 0, 0, 1]))
    torch.testing.assert_close(out, torch.tensor([[-1.0, -1], [1, 1], [1, 1], [-1, -1]]))


def test_shared_mode_heads_depend_on_the_landmark():
    torch.manual_seed(0)
    net = GlimpseModelNet(SMALL).eval()
    x = _patches(1, 3).expand(3, -1, -1, -1)
    with torch.no_grad():
        net.nets[0].head_b.copy_(torch.tensor([[1.0, 2], [3, 4], [5, 6]]))
        out = net(x, torch.tensor([0, 1, 2]))
    # same patches, different landmark -> different outputs, each near its head bias
    assert not torch.allclose(out[0], out[1])
    torch.testing.assert_close(out, torch.tensor([[1.0, 2], [3, 4], [5, 6]]), atol=0.05, rtol=0)


def test_fresh_network_predicts_small_offsets():
    torch.manual_seed(0)
    net = GlimpseModelNet(SMALL).eval()
    with torch.no_grad():
        out = net(_patches(4, 3), torch.tensor([0, 1, 2, 0]))
    assert float(out.abs().max()) < 0.1  # head initialised near zero: start where you are


def test_config_dict_round_trip():
    cfg = ModelConfig(trunk="compact", width=8, mode="per_landmark", n_landmarks=5, n_levels=4, hidden=(32, 16))
    d = cfg.to_dict()
    assert d["hidden"] == [32, 16]
    assert ModelConfig.from_dict(d) == cfg
    assert ModelConfig.from_dict({**d, "unknown_future_key": 1}) == cfg
