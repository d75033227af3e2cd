"""The glimpse network: trunk -> spatial-softmax integral features -> MLP -> offset.

The same trunk runs on every pyramid level of a glimpse. For each channel a softmax over the
trunk's ``h x w`` output gives the expected position (x, y) and the expected activation, so each
level yields ``3 x C`` numbers. The MLP maps all levels' features to an offset (in the glimpse
frame, in units of ``offset_unit`` full-resolution pixels) from the glimpse centre to the landmark.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._serde import DictConfig


@dataclass(frozen=True)
class ModelConfig(DictConfig):
    """Architecture. ``trunk``: ``compact`` (default) or ``paper`` (ResNet-34 cut as published).

    ``mode``: ``shared`` (one network for all landmarks: a landmark embedding in the first MLP
    layer and one output head per landmark) or ``per_landmark`` (one network each, as published).
    """

    trunk: str = "compact"
    width: int = 32
    mode: str = "shared"
    n_landmarks: int = 19
    n_levels: int = 6
    patch: int = 64
    hidden: tuple[int, ...] = (512, 128)
    offset_unit: float = 100.0


# ----------------------------------------------------------------------------------- trunks
def _conv_bn(ci: int, co: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(ci, co, 3, stride, 1, bias=False), nn.BatchNorm2d(co), nn.ReLU(inplace=True))


class CompactTrunk(nn.Sequential):
    """Six 3x3 conv-BN-ReLU layers, three of stride 2: 1x64x64 -> (4w)x8x8."""

    def __init__(self, width: int = 32):
        w = width
        super().__init__(
            _conv_bn(1, w, 2), _conv_bn(w, w, 1),
            _conv_bn(w, 2 * w, 2), _conv_bn(2 * w, 2 * w, 1),
            _conv_bn(2 * w, 4 * w, 2), _conv_bn(4 * w, 4 * w, 1),
        )
        self.out_channels = 4 * w


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock, with the same parameter names."""

    def __init__(self, ci: int, co: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(ci, co, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(co)
        self.conv2 = nn.Conv2d(co, co, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(co)
        self.downsample = None
        if stride != 1 or ci != co:
            self.downsample = nn.Sequential(nn.Conv2d(ci, co, 1, stride, bias=False), nn.BatchNorm2d(co))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idt = x if self.downsample is None else self.downsample(x)
        y = F.relu(self.bn1(self.conv1(x)), inplace=True)
        y = self.bn2(self.conv2(y))
        return F.relu(y + idt, inplace=True)


class PaperTrunk(nn.Module):
    """ResNet-34 without layer4/fc, conv1 stride 1, grey input: 1x64x64 -> 256x8x8.

    Parameter names match torchvision's ``resnet34`` so ImageNet weights load directly (the
    3-channel conv1 kernel is summed to one channel). torchvision itself is imported only when
    its weights are requested.
    """

    out_channels = 256

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 64, 7, 1, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, 1)

        def layer(ci, co, n, stride):
            return nn.Sequential(BasicBlock(ci, co, stride), *[BasicBlock(co, co) for _ in range(n - 1)])

        self.layer1 = layer(64, 64, 3, 1)
        self.layer2 = layer(64, 128, 4, 2)
        self.layer3 = layer(128, 256, 6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x)), inplace=True))
        return self.layer3(self.layer2(self.layer1(x)))

    def load_imagenet(self, source: str | None = None) -> None:
        """Load ImageNet weights: from a local state-dict file, or torchvision's download."""
        if source:
            sd = torch.load(source, map_location="cpu", weights_only=True)
            if isinstance(sd, dict) and "state_dict" in sd:
                sd = sd["state_dict"]
        else:
            from torchvision.models import ResNet34_Weights  # lazy: see DEVELOPERS.md

            sd = ResNet34_Weights.IMAGENET1K_V1.get_state_dict(progress=True)
        sd = {k: v for k, v in sd.items() if not k.startswith(("layer4.", "fc."))}
        if sd.get("conv1.weight") is not None and sd["conv1.weight"].shape[1] == 3:
            sd["conv1.weight"] = sd["conv1.weight"].sum(dim=1, keepdim=True)
        missing, unexpected = self.load_state_dict(sd, strict=False)
        if missing:
            raise ValueError(f"pretrained weights lack {len(missing)} trunk tensors, e.g. {missing[0]}")


def make_trunk(cfg: ModelConfig) -> nn.Module:
    if cfg.trunk == "compact":
        return CompactTrunk(cfg.width)
    if cfg.trunk == "paper":
        return PaperTrunk()
    raise ValueError(f"unknown trunk {cfg.trunk!r} (compact or paper)")


# ------------------------------------------------------------------------- integral features
def spatial_softmax_features(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Integral features of an activation map ``a`` of shape ``(N, C, h, w)``.

    Returns ``(features, heatmaps)``: features ``(N, C, 3)`` = expected x, expected y (cell
    centres in [-1, 1], x along width) and expected activation under the per-channel softmax;
    heatmaps ``(N, C, h, w)`` = the softmax itself.
    """
    n, c, h, w = a.shape
    a = a.float()
    p = torch.softmax(a.reshape(n, c, h * w), dim=-1)
    ys = (torch.arange(h, device=a.device, dtype=a.dtype) + 0.5) / h * 2 - 1
    xs = (torch.arange(w, device=a.device, dtype=a.dtype) + 0.5) / w * 2 - 1
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    ex = (p * gx.reshape(1, 1, -1)).sum(-1)
    ey = (p * gy.reshape(1, 1, -1)).sum(-1)
    ea = (p * a.reshape(n, c, -1)).sum(-1)
    return torch.stack([ex, ey, ea], dim=-1), p.reshape(n, c, h, w)


# ------------------------------------------------------------------------------- networks
class GlimpseNet(nn.Module):
    """One trunk + MLP. In ``shared`` mode it serves all landmarks (embedding + heads)."""

    def __init__(self, cfg: ModelConfig, n_heads: int):
        super().__init__()
        self.cfg = cfg
        self.trunk = make_trunk(cfg)
        c = self.trunk.out_channels
        dims = [cfg.n_levels * c * 3, *cfg.hidden]
        self.fc = nn.ModuleList(nn.Linear(dims[i], dims[i + 1]) for i in range(len(dims) - 1))
        self.n_heads = n_heads
        self.embed = nn.Embedding(n_heads, dims[1]) if n_heads > 1 else None
        if self.embed is not None:
            nn.init.zeros_(self.embed.weight)
        self.head_w = nn.Parameter(torch.zeros(n_heads, 2, dims[-1]))
        self.head_b = nn.Parameter(torch.zeros(n_heads, 2))
        nn.init.normal_(self.head_w, std=1e-3)

    def forward(self, patches: torch.Tensor, landmark: torch.Tensor, heatmaps: bool = False):
        b, lv, p, _ = patches.shape
        x = ((patches / 255.0) - 0.5) / 0.25
        x = x.reshape(b * lv, 1, p, p).contiguous(memory_format=torch.channels_last)
        feat, hm = spatial_softmax_features(self.trunk(x))
        h = feat.reshape(b, -1)
        for i, layer in enumerate(self.fc):
            h = layer(h)
            if i == 0 and self.embed is not None:
                h = h + self.embed(landmark)
            h = F.relu(h)
        out = torch.einsum("bh,bkh->bk", h.float(), self.head_w[landmark]) + self.head_b[landmark]
        if heatmaps:
            return out, hm.reshape(b, lv, *hm.shape[1:])
        return out


class GlimpseModelNet(nn.Module):
    """All landmarks: one shared :class:`GlimpseNet`, or one per landmark."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.mode == "shared":
            self.nets = nn.ModuleList([GlimpseNet(cfg, cfg.n_landmarks)])
        elif cfg.mode == "per_landmark":
            self.nets = nn.ModuleList([GlimpseNet(cfg, 1) for _ in range(cfg.n_landmarks)])
        else:
            raise ValueError(f"unknown mode {cfg.mode!r} (shared or per_landmark)")

    def forward(self, patches: torch.Tensor, landmark: torch.Tensor, heatmaps: bool = False):
        """Offsets ``(B, 2)`` (glimpse frame, units of ``offset_unit``) for ``(B, L, P, P)`` patches."""
        if self.cfg.mode == "shared":
            return self.nets[0](patches, landmark, heatmaps)
        out = torch.zeros(patches.shape[0], 2, device=patches.device)
        hms = None
        for k in torch.unique(landmark).tolist():
            sel = landmark == k
            r = self.nets[k](patches[sel], torch.zeros_like(landmark[sel]), heatmaps)
            if heatmaps:
                r, hm = r
                if hms is None:
                    hms = torch.zeros(patches.shape[0], *hm.shape[1:], device=patches.device)
                hms[sel] = hm.float()
            out[sel] = r.float()
        return (out, hms) if heatmaps else out

    def load_pretrained_trunk(self, source: str | None = None) -> None:
        for net in self.nets:
            if not isinstance(net.trunk, PaperTrunk):
                raise ValueError("ImageNet weights exist only for the paper trunk")
            net.trunk.load_imagenet(source)
