"""What the napari widgets draw, computed from a :class:`~napari_glimpse.inference.Trajectory`.

Plain numpy: no Qt and no napari import, so it is tested headless. Layer data follows napari:
points are ``(row, col) = (y, x)``; an image layer's pixel ``j`` sits at ``translate + j * scale``.

Geometry of a glimpse (see :mod:`napari_glimpse.glimpse`): level ``l`` samples a ``P x P`` patch
at ``2**l`` full-resolution pixels per sample, centred on the estimate ``c``; sample ``j`` lies at
``c + (j - (P - 1) / 2) * 2**l``. The trunk's ``h x w`` heatmap cell ``m`` pools samples
``m * P/h ... (m + 1) * P/h - 1``, so its centre lies at ``c + ((m + 0.5) * P / h - P / 2) * 2**l``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .inference import Trajectory
from .landmark_set import PALETTE_RGB
from .landmarks import ISBI_ABBREVIATIONS, ISBI_LANDMARKS

_PALETTE = np.array(PALETTE_RGB, dtype=np.float64) / 255.0  # RGB 0..1

LayerData = tuple[Any, dict, str]


def landmark_colors(n: int, names: Sequence[str] | None = None) -> np.ndarray:
    """``(n, 4)`` RGBA, one distinct colour per landmark (cycling past 19); a registered set's own
    colour (:func:`register_labels`) for its ``names``."""
    rgb = _PALETTE[np.arange(n) % len(_PALETTE)]
    if names is not None and _COLOURS:
        rgb = np.array([_COLOURS.get(nm, tuple(c)) for nm, c in zip(names, rgb)], dtype=np.float64).reshape(n, 3)
    return np.column_stack([rgb, np.ones(n)])


def confidence_colors(confidence: np.ndarray) -> np.ndarray:
    """``(n, 4)`` RGBA from red (0) through yellow (0.5) to green (1)."""
    c = np.clip(np.asarray(confidence, dtype=np.float64), 0.0, 1.0)
    r = np.clip(2.0 * (1.0 - c), 0.0, 1.0)
    g = np.clip(2.0 * c, 0.0, 1.0)
    return np.column_stack([r, g, np.zeros_like(c), np.ones_like(c)])


_LABELS: dict[str, str] = dict(zip(ISBI_LANDMARKS, ISBI_ABBREVIATIONS))
_COLOURS: dict[str, tuple[float, float, float]] = {}  # a registered set's colours, RGB 0..1


def register_labels(names: Sequence[str], labels: Sequence[str], colours: Sequence[str] = ()) -> None:
    """Draw these landmarks with these short labels (a landmark set's, see :func:`abbreviations`) and,
    if given, these colours (``#rrggbb`` or ``#rgb``; :func:`landmark_colors`)."""
    _LABELS.update((n, lab) for n, lab in zip(names, labels) if lab)
    for n, c in zip(names, colours):
        h = c.strip().lstrip("#")
        h = "".join(ch * 2 for ch in h) if len(h) == 3 else h
        _COLOURS[n] = tuple(int(h[i:i + 2], 16) / 255.0 for i in (0, 2, 4))


def abbreviations(names: Sequence[str]) -> list[str]:
    """Short labels: the ISBI abbreviations for ISBI names, a registered set's labels
    (:func:`register_labels`), else the names themselves."""
    return [_LABELS.get(n, n) for n in names]


def points_size(image_shape: tuple[int, int]) -> float:
    """A marker size (data pixels) that stays visible with the whole image in view, small enough
    (hollow rings of ~2 mm on a cephalogram) not to hide the anatomy being judged."""
    return float(max(10.0, round(max(image_shape) / 120.0)))


# Review states of a landmark, their markers and label suffixes (legend in the review widget)
PROPOSED, CORRECTED, ACCEPTED, ABSENT = "proposed", "corrected", "accepted", "absent"
STATE_SYMBOL = {PROPOSED: "ring", CORRECTED: "cross", ACCEPTED: "disc"}
STATE_MARK = {PROPOSED: "", CORRECTED: "*", ACCEPTED: " ok"}
STATE_LEGEND = (
    (PROPOSED, "ring: the model's proposal (ring colour = how sure it is: red unsure, green sure)"),
    (CORRECTED, "cross, label with *: moved or placed by you"),
    (ACCEPTED, "small dot, label with ok: the image is accepted"),
    (ABSENT, "no marker, table says absent: marked not visible"),
)


def review_states(n: int, corrected: Sequence[int] = (), absent: Sequence[int] = (),
                  accepted: bool = False) -> np.ndarray:
    """``(n,)`` state of each landmark: proposed, corrected, accepted (the whole image) or absent."""
    st = np.full(n, ACCEPTED if accepted else PROPOSED, dtype=object)
    if not accepted:
        st[list(corrected)] = CORRECTED
    st[list(absent)] = ABSENT
    return st


def label_texts(yx: np.ndarray, abbr: Sequence[str], image_shape: tuple[int, int],
                view_px: float = 700.0, font_px: float = 11.0) -> list[str]:
    """Labels that do not overlap with the whole image in view: landmarks whose labels would collide
    share one label (``"LIT/UIT"`` on the first of them; the others get none).

    ``yx`` are the points (data pixels) in drawing order; the label boxes are estimated for the
    image's longer side shown over ``view_px`` screen pixels with ``font_px`` text. (napari places
    every label at the same offset from its point, and vispy anchors on the glyphs, so moving one
    label by padding it with blank lines or spaces does not work.)
    """
    per_px = max(image_shape) / view_px  # data pixels per screen pixel
    line, char = 1.3 * font_px * per_px, 0.65 * font_px * per_px
    boxes: list[list[float]] = []  # x0, y0, x1, y1 of each shown label
    owner: list[int] = []          # the point each shown label sits on
    out = [""] * len(abbr)
    for i, ((y, x), text) in enumerate(zip(np.asarray(yx, dtype=np.float64), abbr)):
        box = [x, y, x + max(1, len(text)) * char, y + line]
        hit = next((j for j, b in enumerate(boxes)
                    if box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3]), None)
        if hit is None:
            boxes.append(box)
            owner.append(i)
            out[i] = text
        else:
            j = owner[hit]
            out[j] = f"{out[j]}/{text}"
            boxes[hit][2] = boxes[hit][0] + len(out[j]) * char
    return out


def landmark_content(
    positions: np.ndarray,
    names: Sequence[str],
    confidence: np.ndarray | None = None,
    uncertainty_mm: np.ndarray | None = None,
    states: Sequence[str] | None = None,
    image_shape: tuple[int, int] = (2400, 1935),
) -> dict[str, Any]:
    """Data and per-point styling of a landmarks Points layer.

    ``positions`` is ``(K, 2)`` x, y with NaN rows for missing landmarks (left out). Returns
    ``data`` (y, x), ``features`` (``landmark``, ``abbr``, 1-based ``index``, ``confidence``,
    ``uncertainty_mm``, review ``state``, collision-free ``label``), ``face_color`` (one colour per
    landmark), ``border_color`` (confidence: red = unsure, green = sure; grey when unknown) and
    ``symbol`` (by review state, see :data:`STATE_SYMBOL`).
    """
    pos = np.asarray(positions, dtype=np.float64)
    k = len(pos)
    present = np.isfinite(pos).all(axis=1)
    conf = np.full(k, np.nan) if confidence is None else np.asarray(confidence, dtype=np.float64)
    unc = np.full(k, np.nan) if uncertainty_mm is None else np.asarray(uncertainty_mm, dtype=np.float64)
    state = review_states(k) if states is None else np.asarray(list(states), dtype=object)
    border = confidence_colors(np.nan_to_num(conf, nan=0.5))
    border[~np.isfinite(conf)] = (0.6, 0.6, 0.6, 1.0)
    border[state == CORRECTED] = (1.0, 1.0, 1.0, 1.0)
    abbr = np.asarray(abbreviations(names), dtype=object)
    marked = [a + STATE_MARK.get(s, "") for a, s in zip(abbr[present], state[present])]
    data = pos[present][:, ::-1].copy()
    feats = {
        "landmark": np.asarray(list(names), dtype=object)[present],
        "abbr": abbr[present],
        "index": np.arange(1, k + 1)[present],
        "confidence": conf[present],
        "uncertainty_mm": unc[present],
        "state": state[present],
        "label": np.asarray(label_texts(data, marked, image_shape), dtype=object),
    }
    return {
        "data": data,
        "features": feats,
        "face_color": landmark_colors(k, names)[present],
        "border_color": border[present],
        "symbol": np.asarray([STATE_SYMBOL.get(s, "ring") for s in state[present]], dtype=object),
    }


def landmarks_layer_from(
    positions: np.ndarray,
    names: Sequence[str],
    confidence: np.ndarray | None = None,
    uncertainty_mm: np.ndarray | None = None,
    image_shape: tuple[int, int] = (2400, 1935),
    name: str = "landmarks",
    image_path: str | os.PathLike | None = None,
    pixel_spacing: float | None = None,
    states: Sequence[str] | None = None,
) -> LayerData:
    """A landmarks Points layer from ``(K, 2)`` x, y positions (see :func:`landmark_content`).

    The layer's metadata carries the image path and the landmark names.
    """
    c = landmark_content(positions, names, confidence, uncertainty_mm, states, image_shape)
    size = points_size(image_shape)
    kwargs: dict[str, Any] = {
        "name": name,
        "features": c["features"],
        "face_color": c["face_color"] if len(c["data"]) else "white",  # no point yet (annotating from zero)
        "border_color": c["border_color"] if len(c["data"]) else "gray",
        "symbol": c["symbol"] if len(c["symbol"]) else "ring",
        "border_width": 0.12,
        "border_width_is_relative": True,
        "opacity": 0.85,
        "size": size,
        "text": {
            "string": "{label}",
            "size": 11,
            "color": "yellow",
            "anchor": "upper_left",
            "translation": [0.6 * size, 0.6 * size],
        },
        "metadata": {
            "napari_glimpse": True,
            "image_path": str(image_path) if image_path is not None else None,
            "landmark_names": list(names),
            "pixel_spacing": pixel_spacing,
        },
    }
    return c["data"], kwargs, "points"


def landmarks_layer(
    traj: Trajectory,
    name: str = "landmarks",
    image_path: str | os.PathLike | None = None,
) -> LayerData:
    """The model's answer as one Points layer: a colour per landmark, confidence as border."""
    return landmarks_layer_from(
        traj.final, traj.landmark_names, traj.confidence, traj.uncertainty_mm,
        traj.image_shape, name, image_path, traj.pixel_spacing,
    )


# ----------------------------------------------------------------------- glimpse explorer
def level_scale(level: int) -> float:
    return float(2**level)


Placement = tuple[tuple[float, float], tuple[float, float]]


def glimpse_placement(center_xy: Sequence[float], level: int, patch: int) -> Placement:
    """``(scale, translate)`` (y, x) of an image layer showing a level-``level`` patch."""
    f = level_scale(level)
    cx, cy = float(center_xy[0]), float(center_xy[1])
    off = (patch - 1) / 2.0 * f
    return (f, f), (cy - off, cx - off)


def heatmap_placement(center_xy: Sequence[float], level: int, patch: int, cells: int) -> Placement:
    """``(scale, translate)`` (y, x) of an image layer showing a ``cells x cells`` heatmap."""
    f = level_scale(level)
    step = patch / cells * f
    cx, cy = float(center_xy[0]), float(center_xy[1])
    first = (0.5 * patch / cells - patch / 2.0) * f
    return (step, step), (cy + first, cx + first)


def glimpse_box(center_xy: Sequence[float], level: int, patch: int) -> np.ndarray:
    """``(4, 2)`` corners (y, x) of the square a level-``level`` patch covers."""
    half = patch * level_scale(level) / 2.0
    cx, cy = float(center_xy[0]), float(center_xy[1])
    return np.array([[cy - half, cx - half], [cy - half, cx + half], [cy + half, cx + half], [cy + half, cx - half]])


def offset_vector(traj: Trajectory, k: int, t: int) -> np.ndarray:
    """``(1, 2, 2)`` napari vector (start (y, x), step (dy, dx)) of iteration ``t``'s move."""
    start = traj.positions[t, k]
    step = traj.positions[t + 1, k] - start
    return np.array([[[start[1], start[0]], [step[1], step[0]]]], dtype=np.float64)


def trajectory_path(traj: Trajectory, k: int, t: int) -> np.ndarray:
    """``(t + 2, 2)`` (y, x) of the estimates from the start to after iteration ``t``."""
    return traj.positions[: t + 2, k, ::-1].astype(np.float64).copy()


def border_margin(side: int) -> int:
    """Cells left out at each border of a ``side x side`` map when scoring it: 1 per 8 cells
    (at least 1; none for maps under 4 cells a side)."""
    return 0 if side < 4 else max(1, side // 8)


def channel_peakedness(traj: Trajectory, k: int, t: int, level: int) -> np.ndarray:
    """``(C,)`` maximum of each channel's softmax map inside a border band (high = the channel
    points somewhere in the glimpse).

    The band (:func:`border_margin`) is left out: zero padding makes some channels pile their mass
    on the patch's edge, a peak that points nowhere (an artefact, not the landmark).
    """
    if traj.heatmaps is None:
        raise ValueError("the trajectory holds no heatmaps (predict with record_heatmaps=True)")
    hm = traj.heatmaps[t, k, level].astype(np.float32)
    mh, mw = border_margin(hm.shape[-2]), border_margin(hm.shape[-1])
    inner = hm[:, mh: hm.shape[-2] - mh, mw: hm.shape[-1] - mw]
    return inner.reshape(inner.shape[0], -1).max(axis=1)


def top_channels(traj: Trajectory, k: int, t: int, level: int, n: int = 4) -> list[int]:
    """The ``n`` most peaked channels of a level's heatmaps."""
    return [int(c) for c in np.argsort(-channel_peakedness(traj, k, t, level))[:n]]


def stretch(a: np.ndarray) -> np.ndarray:
    """``a`` as float32 stretched to its range: its minimum 0, its maximum 1 (all 0 when flat)."""
    a = np.asarray(a, dtype=np.float32)
    return (a - a.min()) / max(float(a.max() - a.min()), 1e-12)


def _inferno_like(v: np.ndarray) -> np.ndarray:
    """A small black-red-yellow-white ramp for ``v`` in [0, 1] -> uint8 RGB."""
    stops = np.array([[0, 0, 4], [120, 28, 109], [237, 105, 37], [252, 255, 164]], dtype=np.float64)
    x = np.clip(v, 0, 1) * (len(stops) - 1)
    i = np.minimum(x.astype(int), len(stops) - 2)
    f = (x - i)[..., None]
    return (stops[i] * (1 - f) + stops[i + 1] * f).round().astype(np.uint8)


def tile_strip(traj: Trajectory, k: int, t: int, channels: Sequence[int] = (), gap: int = 4) -> np.ndarray:
    """Iteration ``t``'s glimpse of landmark ``k`` as side-by-side ``P x P`` tiles (uint8 RGB).

    Row 0: the patch of every level (finest first) with the estimate marked; following rows: the
    softmax heatmap of each channel in ``channels`` per level (nearest-upsampled to ``P x P``,
    each stretched to its own range).
    """
    if traj.glimpses is None:
        raise ValueError("the trajectory holds no glimpses (predict with record_glimpses=True)")
    g = traj.glimpses[t, k]  # (L, P, P)
    n_levels, p = g.shape[0], g.shape[-1]
    rows = 1 + len(channels)
    out = np.full((rows * p + (rows - 1) * gap, n_levels * p + (n_levels - 1) * gap, 3), 40, np.uint8)
    for lv in range(n_levels):
        x0 = lv * (p + gap)
        tile = np.repeat(g[lv][..., None], 3, axis=-1)
        c = p // 2
        tile[c - 1 : c + 1, max(0, c - 6) : c + 6] = (255, 60, 60)
        tile[max(0, c - 6) : c + 6, c - 1 : c + 1] = (255, 60, 60)
        out[:p, x0 : x0 + p] = tile
        for r, ch in enumerate(channels):
            if traj.heatmaps is None:
                break
            hm = stretch(traj.heatmaps[t, k, lv, ch])
            rep = p // hm.shape[-1]
            up = np.kron(hm, np.ones((rep, rep), np.float32))
            y0 = (r + 1) * (p + gap)
            out[y0 : y0 + p, x0 : x0 + p] = _inferno_like(up)
    return out


def _upsample(a: np.ndarray, f: int) -> np.ndarray:
    """Nearest upsampling of a 2-D map by an integer factor."""
    return a if f == 1 else np.repeat(np.repeat(a, f, axis=0), f, axis=1)


def glimpse_overlay(traj: Trajectory, k: int, t: int, top: int, heat: np.ndarray | None = None,
                    heat_level: int = 0, opacity: float = 0.92) -> tuple[np.ndarray, tuple, tuple]:
    """Iteration ``t``'s glimpse of landmark ``k`` as one RGBA image at full resolution.

    Levels ``top`` ... 0 are pasted coarse first (so each finer patch sits on its coarser one,
    nearest-upsampled by ``2**l``), with alpha ``opacity`` where a patch is and 0 elsewhere;
    ``heat`` (a level-``heat_level`` map in 0..1) is added over its patch's square with the
    inferno ramp. Returns ``(rgba, scale, translate)``, the (y, x) placement of an image layer
    (pixel ``i`` at ``c + i - (N - 1) / 2``), so every level sits where :func:`glimpse_placement`
    puts it.
    """
    g = traj.glimpses[t, k]
    p = g.shape[-1]
    span = max(top, heat_level if heat is not None else 0)
    n = p * 2**span
    grey = np.zeros((n, n), np.uint8)
    alpha = np.zeros((n, n), np.uint8)
    for lv in range(min(top, g.shape[0] - 1), -1, -1):
        f = 2**lv
        lo = (n - p * f) // 2
        grey[lo: lo + p * f, lo: lo + p * f] = _upsample(g[lv], f)
        alpha[lo: lo + p * f, lo: lo + p * f] = round(255 * opacity)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    if heat is not None:
        side = p * 2**heat_level
        lo = (n - side) // 2
        up = _upsample(np.asarray(heat, np.float32), side // heat.shape[-1])
        sub = rgb[lo: lo + side, lo: lo + side].astype(np.float32) + 0.55 * _inferno_like(up)
        rgb[lo: lo + side, lo: lo + side] = sub.clip(0, 255).astype(np.uint8)
        alpha[lo: lo + side, lo: lo + side] = np.maximum(alpha[lo: lo + side, lo: lo + side], round(255 * opacity))
    cx, cy = (float(v) for v in traj.positions[t, k])
    sx, sy = (1.0 / float(v) for v in traj.model_scale)  # image pixels per model pixel
    half = (n - 1) / 2.0
    return np.dstack([rgb, alpha]), (sy, sx), (cy - half * sy, cx - half * sx)


def glimpse_boxes(traj: Trajectory, k: int, t: int, top: int) -> list[np.ndarray]:
    """The outlines (``(4, 2)`` corners (y, x) each) of iteration ``t``'s levels 0 ... ``top``, in
    the image's pixels (a glimpse is taken in the model's: see ``Trajectory.model_scale``)."""
    c = traj.positions[t, k]
    ms = np.asarray(traj.model_scale, dtype=np.float64)[::-1]  # (y, x)
    return [c[::-1] + (glimpse_box((0.0, 0.0), lv, traj.patch) / ms) for lv in range(top + 1)]


def arrow_shapes(vector: np.ndarray, head: float | None = None) -> list[tuple[np.ndarray, str]]:
    """A napari vector ``(1, 2, 2)`` (start (y, x), step (dy, dx)) as Shapes: a ``path`` shaft and
    a ``polygon`` head whose tip is the end (none for a step under 0.5 pixel)."""
    start, step = np.asarray(vector, dtype=np.float64).reshape(2, 2)
    length = float(np.hypot(*step))
    if length < 0.5:
        return []
    u = step / length
    normal = np.array([-u[1], u[0]])
    h = min(length, float(np.clip(0.45 * length, 2.0, 40.0)) if head is None else head)
    end = start + step
    base = end - u * h
    tip = np.array([end, base + normal * 0.6 * h, base - normal * 0.6 * h])
    return [(np.array([start, end - u * 0.5 * h]), "path"), (tip, "polygon")]


# ------------------------------------------------------------------- coarse -> fine stages
# Geometry of a fine look (see napari_glimpse.fine and Trajectory): look ``s`` of landmark ``k`` is
# centred on ``traj.stage_positions[s, k]`` (the coarse answer for the first look); window pixel
# ``j`` of context level ``c`` sits at ``centre + (j - (P - 1) / 2) * traj.fine_window_scale[c]``
# (x, y); heatmap cell ``m`` (``h`` cells) pools window pixels ``m * P/h ... (m + 1) * P/h - 1`` of
# the finest window.
COARSE_RGB = (255, 80, 80)   # where a look starts (the coarse answer)
FINE_RGB = (60, 230, 120)    # its answer
# the fine heatmap over the image: transparent where it is low, so that it shows on bright bone
# and dark soft tissue alike (RGBA control points, 0..1)
HEAT_RGBA = np.array([[0.0, 0.0, 0.0, 0.0], [0.85, 0.1, 0.45, 0.45], [1.0, 0.45, 0.0, 0.8], [1.0, 0.95, 0.3, 1.0]])


def has_stages(traj: Trajectory | None) -> bool:
    """Whether ``traj`` holds coarse -> fine stage records (``predict(record_stages=True)``)."""
    return traj is not None and traj.fine_windows is not None and traj.fine_looks > 0


def _stages(traj: Trajectory) -> np.ndarray:
    if not has_stages(traj):
        raise ValueError("the trajectory holds no stage records (predict with record_stages=True)")
    return traj.stage_positions  # type: ignore[return-value]


def fine_window_side(traj: Trajectory, c: int) -> np.ndarray:
    """``(2,)`` side (x, y) in full-resolution pixels of context level ``c``'s fine window."""
    _stages(traj)
    return traj.fine_windows.shape[-1] * np.asarray(traj.fine_window_scale[c], dtype=np.float64)


def fine_look_caption(traj: Trajectory, k: int, s: int) -> str:
    """The explorer's text for landmark ``k``'s fine look ``s``: where it started and ended, how
    far it moved, its windows' levels and sides, and (with several fine nets) whose maps are
    shown."""
    st = _stages(traj)
    start, end = st[s, k], st[s + 1, k]
    mm = float(np.hypot(*(end - start))) * traj.pixel_spacing
    sides = ", ".join(f"L{traj.fine_level + c} {fine_window_side(traj, c)[0] * traj.pixel_spacing:.1f} mm"
                      for c in range(traj.fine_windows.shape[2]))
    text = (f"<b>{traj.landmark_names[k]}</b> {'coarse answer (red)' if s == 0 else f'fine look {s} answer (green)'} "
            f"({start[0]:.0f}, {start[1]:.0f}) px → fine{f' look {s + 1}' if traj.fine_looks > 1 else ''} answer "
            f"(green) ({end[0]:.0f}, {end[1]:.0f}) px: moved {mm:.1f} mm; windows {sides}")
    shown, total = traj.fine_nets or (1, 1)
    if shown < total:
        return text + (f"; heatmap: mean of {shown} of {total} fine nets (the other {total - shown} read other "
                       f"levels; the answer is all {total} nets')")
    return text + (f"; heatmap: mean of {total} fine nets" if total > 1 else "")


def fine_window_box(traj: Trajectory, k: int, s: int, c: int) -> np.ndarray:
    """``(4, 2)`` corners (y, x) of the square fine look ``s``'s context-``c`` window covers."""
    cx, cy = _stages(traj)[s, k]
    hx, hy = fine_window_side(traj, c) / 2.0
    return np.array([[cy - hy, cx - hx], [cy - hy, cx + hx], [cy + hy, cx + hx], [cy + hy, cx - hx]])


def fine_heatmap_placement(traj: Trajectory, k: int, s: int) -> tuple[tuple[float, float], tuple[float, float]]:
    """``(scale, translate)`` (y, x) of an image layer showing fine look ``s``'s heatmap of landmark ``k``."""
    cx, cy = _stages(traj)[s, k]
    p, cells = traj.fine_windows.shape[-1], traj.fine_heatmaps.shape[-1]
    fx, fy = (float(v) for v in traj.fine_window_scale[0])
    first = 0.5 * p / cells - p / 2.0  # window pixels from the centre to the first cell's centre
    return (p / cells * fy, p / cells * fx), (cy + first * fy, cx + first * fx)


def stage_vector(traj: Trajectory, k: int, s: int) -> np.ndarray:
    """``(1, 2, 2)`` napari vector (start (y, x), step (dy, dx)) of fine look ``s``'s move."""
    st = _stages(traj)
    start, step = st[s, k], st[s + 1, k] - st[s, k]
    return np.array([[[start[1], start[0]], [step[1], step[0]]]], dtype=np.float64)


def stage_points(traj: Trajectory, k: int, s: int) -> tuple[np.ndarray, dict[str, list[str]]]:
    """``(s + 2, 2)`` (y, x) of the coarse answer and the answers of fine looks ``0 .. s``, and
    their features: ``label`` (``coarse``, ``fine`` or ``fine 1``, ``fine 2``, ...) and ``color``
    (hex: red for the coarse answer, green for the fine ones)."""
    st = _stages(traj)
    n = traj.fine_looks
    labels = ["coarse"] + (["fine"] if n == 1 else [f"fine {i + 1}" for i in range(s + 1)])
    hexes = ["#%02x%02x%02x" % COARSE_RGB] + ["#%02x%02x%02x" % FINE_RGB] * (s + 1)
    return st[: s + 2, k, ::-1].astype(np.float64).copy(), {"label": labels[: s + 2], "color": hexes}


def _cross(tile: np.ndarray, xy: Sequence[float], rgb: Sequence[int], arm: int = 5) -> None:
    """Draw a 2-pixel-wide cross centred on ``xy`` (tile pixels, x, y) in place, clipped to the tile."""
    h, w = tile.shape[:2]
    x, y = int(round(float(xy[0]))), int(round(float(xy[1])))
    if not (0 <= x < w and 0 <= y < h):
        return
    tile[max(0, y - 1): y + 1, max(0, x - arm): x + arm + 1] = rgb
    tile[max(0, y - arm): y + arm + 1, max(0, x - 1): x + 1] = rgb


def _fit(a: np.ndarray, side: int) -> np.ndarray:
    """A square map resized to ``side x side``: nearest when enlarging, block maximum when
    shrinking (a peak must not vanish)."""
    n = a.shape[-1]
    if side >= n and side % n == 0:
        return np.kron(a, np.ones((side // n, side // n), a.dtype))
    if side < n and n % side == 0:
        f = n // side
        return a.reshape(side, f, side, f).max(axis=(1, 3))
    idx = np.minimum((np.arange(side) + 0.5) * n / side, n - 1).astype(int)
    return a[np.ix_(idx, idx)]


def fine_tile_strip(traj: Trajectory, k: int, s: int = 0, gap: int = 4) -> np.ndarray:
    """Fine look ``s`` of landmark ``k`` as side-by-side ``P x P`` tiles (uint8 RGB).

    Row 0: the window of every context level (finest first), a red cross where the look started
    (the window centre) and a green one on its answer; row 1: the same windows with landmark
    ``k``'s softmax heatmap (stretched to its range, square-rooted to show the peak's tail) over
    the part the finest window covers.
    """
    st = _stages(traj)
    win = traj.fine_windows[s, k]  # (C, P, P)
    n_ctx, p = win.shape[0], win.shape[-1]
    hm = stretch(traj.fine_heatmaps[s, k])
    out = np.full((2 * p + gap, n_ctx * p + (n_ctx - 1) * gap, 3), 40, np.uint8)
    for c in range(n_ctx):
        x0 = c * (p + gap)
        grey = np.repeat(win[c][..., None], 3, axis=-1)
        over = grey.astype(np.float32)
        r = p // 2**c  # the finest window's extent in this window's pixels
        lo = (p - r) // 2
        v = np.sqrt(_fit(hm, r))
        a = (0.85 * v)[..., None]
        over[lo: lo + r, lo: lo + r] = over[lo: lo + r, lo: lo + r] * (1 - a) + _inferno_like(v) * a
        over = over.round().clip(0, 255).astype(np.uint8)
        answer = (st[s + 1, k] - st[s, k]) / np.asarray(traj.fine_window_scale[c]) + (p - 1) / 2.0
        _cross(grey, ((p - 1) / 2.0, (p - 1) / 2.0), COARSE_RGB)
        _cross(grey, answer, FINE_RGB)
        out[:p, x0: x0 + p] = grey
        out[p + gap:, x0: x0 + p] = over
    return out


def heat_rgba(hm: np.ndarray, gamma: float = 0.5) -> np.ndarray:
    """A heatmap (0..1) as RGBA uint8 with :data:`HEAT_RGBA`: transparent where it is low; ``gamma``
    (< 1) shows the peak's tail too."""
    v = np.clip(np.asarray(hm, np.float32), 0, 1) ** gamma
    x = v * (len(HEAT_RGBA) - 1)
    i = np.minimum(x.astype(int), len(HEAT_RGBA) - 2)
    f = (x - i)[..., None]
    return ((HEAT_RGBA[i] * (1 - f) + HEAT_RGBA[i + 1] * f) * 255).round().astype(np.uint8)


# -------------------------------------------------------------------------- frame labels
LEVEL_COLORS = ["#ff5050", "#ff9f1c", "#ffe600", "#3ddc84", "#33b5ff", "#c77dff", "#ff70a6", "#ffffff"]
PATH_RGB = (0, 255, 255)       # the glimpses' estimates and path
STEP_RGB = (255, 0, 255)       # the step taken (arrow)
HEAT_KEY_RGB = (237, 105, 37)  # what stands for a heatmap in a legend
_SCALE_MM = (0.5, 1, 2, 5, 10, 20, 50, 100)


def _rgb(color: str | Sequence[int]) -> tuple[int, int, int]:
    if isinstance(color, str):
        c = color.lstrip("#")
        return int(c[0:2], 16), int(c[2:4], 16), int(c[4:6], 16)
    return tuple(int(v) for v in color[:3])  # type: ignore[return-value]


def explorer_legend(view: str, source: str, levels: Sequence[int] = (), heat: bool = True) -> list[tuple[str, tuple]]:
    """The colours of an exported explorer frame: ``view`` ``stages`` or ``glimpses``, ``source``
    ``canvas`` or ``tiles``; ``levels`` the pyramid levels outlined (their colours)."""
    if view == "stages":
        items = [("coarse answer", COARSE_RGB), ("fine answer", FINE_RGB)]
        if source == "canvas":
            items += [("coarse -> fine", STEP_RGB)] + [(f"window L{lv}", _rgb(LEVEL_COLORS[lv % len(LEVEL_COLORS)]))
                                                     for lv in levels]
    elif source == "canvas":
        items = [(f"L{lv} patch", _rgb(LEVEL_COLORS[lv % len(LEVEL_COLORS)])) for lv in levels]
        items += [("estimates", PATH_RGB), ("step", STEP_RGB)]
    else:
        items = [("estimate (tile centre)", (255, 60, 60))]
    return items + ([("heatmap", HEAT_KEY_RGB)] if heat else [])


def glimpse_caption(traj: Trajectory, k: int, t: int, image: str = "") -> list[str]:
    """The title lines of glimpse iteration ``t`` of landmark ``k``: name, step, how far it moved."""
    name, abbr = traj.landmark_names[k], abbreviations([traj.landmark_names[k]])[0]
    step = traj.positions[t + 1, k] - traj.positions[t, k]
    mm = float(np.hypot(*step)) * traj.pixel_spacing
    where = f" · {image}" if image else ""
    return [f"{name} ({abbr}) · glimpse step {t + 1}/{traj.iterations}{where}",
            f"step ({step[0]:+.0f}, {step[1]:+.0f}) px = {mm:.1f} mm, from the proposal"]


def stage_caption(traj: Trajectory, k: int, s: int, image: str = "") -> list[str]:
    """The title lines of fine look ``s`` of landmark ``k``: name, look, how far it moved."""
    st = _stages(traj)
    name, abbr = traj.landmark_names[k], abbreviations([traj.landmark_names[k]])[0]
    mm = float(np.hypot(*(st[s + 1, k] - st[s, k]))) * traj.pixel_spacing
    where = f" · {image}" if image else ""
    return [f"{name} ({abbr}) · fine look {s + 1}/{traj.fine_looks}{where}",
            f"{'coarse' if s == 0 else f'look {s}'} -> fine answer: moved {mm:.1f} mm"]


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # a scalable font (Pillow >= 10.1 with FreeType)
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def _wrap(draw: Any, text: str, font: Any, width: int) -> list[str]:
    lines, cur = [], ""
    for word in text.split(" "):
        trial = f"{cur} {word}".strip()
        if cur and draw.textlength(trial, font=font) > width:
            lines.append(cur)
            cur = word
        else:
            cur = trial
    return lines + [cur]


def scale_bar_mm(px_per_mm: float, width: int) -> float | None:
    """The longest round length (mm) whose bar takes at most a quarter of ``width`` pixels."""
    fits = [mm for mm in _SCALE_MM if mm * px_per_mm <= width / 4]
    return fits[-1] if fits else None


def _legend_rows(draw: Any, legend: Sequence[tuple[str, Sequence[int]]], font: Any, x0: int, width: int,
                 size: int) -> list[list[tuple[int, str, tuple]]]:
    """Legend items laid out in rows: (x, text, rgb) each, wrapping at ``width``."""
    rows: list[list] = [[]]
    x = x0
    for text, rgb in legend:
        w = size + 4 + int(draw.textlength(text, font=font)) + 14
        if rows[-1] and x + w > width:
            rows.append([])
            x = 6
        rows[-1].append((x, text, tuple(int(v) for v in rgb)))
        x += w
    return rows


def label_frame(frame: np.ndarray, lines: Sequence[str], px_per_mm: float | None = None,
                legend: Sequence[tuple[str, Sequence[int]]] = (), size: int = 15) -> np.ndarray:
    """``frame`` (RGB(A)) with a title band above (``lines``, wrapped) and a key band below: a
    scale bar (``px_per_mm`` frame pixels per mm; none when ``None``) and the ``legend``'s
    colours (``(text, rgb)`` each). White text on near-black bands (PIL's default font, which
    has no arrows: write ``->``)."""
    from PIL import Image, ImageDraw

    img = Image.fromarray(np.ascontiguousarray(np.asarray(frame)[..., :3]).astype(np.uint8))
    w, h = img.size
    font, lh = _font(size), size + 5
    probe = ImageDraw.Draw(img)
    title = [part for line in lines for part in _wrap(probe, line, font, w - 12)]
    mm = scale_bar_mm(px_per_mm, w) if px_per_mm else None
    bar_w = int(round(mm * px_per_mm)) if mm else 0
    x0 = 6 + (bar_w + int(probe.textlength(f"{mm:g} mm", font=font)) + 24 if mm else 0)
    rows = _legend_rows(probe, legend, font, x0, w - 6, size)
    top, bottom = len(title) * lh + 8, max(1, len(rows)) * lh + 8
    out = Image.new("RGB", (w, top + h + bottom), (18, 18, 18))
    out.paste(img, (0, top))
    d = ImageDraw.Draw(out)
    for i, text in enumerate(title):
        d.text((6, 4 + i * lh), text, fill=(255, 255, 255), font=font)
    y = top + h + 4
    if mm:
        d.rectangle([6, y + lh // 2 - 2, 6 + bar_w, y + lh // 2 + 2], fill=(255, 255, 255))
        d.text((12 + bar_w, y), f"{mm:g} mm", fill=(255, 255, 255), font=font)
    for r, row in enumerate(rows):
        for x, text, rgb in row:
            yy = y + r * lh
            d.rectangle([x, yy + 3, x + size - 4, yy + size - 1], fill=rgb, outline=(255, 255, 255))
            d.text((x + size + 2, yy), text, fill=(255, 255, 255), font=font)
    return np.asarray(out)


def same_size(frames: Sequence[np.ndarray], fill: int = 18) -> list[np.ndarray]:
    """``frames`` padded (bottom, right) to the largest height and width, so none is cropped."""
    h = max(f.shape[0] for f in frames)
    w = max(f.shape[1] for f in frames)
    out = []
    for f in frames:
        pad = np.full((h, w, f.shape[2]), fill, np.uint8)
        pad[: f.shape[0], : f.shape[1]] = f
        out.append(pad)
    return out


# ---------------------------------------------------------------------------- animation
def _gif_frame(frame: np.ndarray) -> Any:
    """An RGB frame as a Pillow palette image for a GIF: 192 greys (the radiograph, without bands)
    and up to 64 colours of its coloured pixels (overlays, legend keys; a plain median cut would
    merge these small areas into the greys)."""
    from PIL import Image

    spread = frame.max(-1).astype(np.int16) - frame.min(-1)
    pal = np.repeat(np.linspace(0, 255, 192).round().astype(np.uint8)[:, None], 3, axis=1)
    colour = frame[spread > 10]
    if len(colour):
        q = Image.fromarray(np.ascontiguousarray(colour[None])).quantize(
            64, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
        pal = np.concatenate([pal, np.asarray(q.getpalette()[: 3 * 64], np.uint8).reshape(-1, 3)])
    pal = np.concatenate([pal, np.zeros((256 - len(pal), 3), np.uint8)])
    ref = Image.new("P", (1, 1))
    ref.putpalette(pal.ravel().tolist())
    return Image.fromarray(frame).quantize(palette=ref, dither=Image.Dither.NONE)


def write_animation(frames: Sequence[np.ndarray], path: str | os.PathLike, fps: float = 2.0,
                    hold_last: int = 1) -> Path:
    """Write RGB(A) ``frames`` as a GIF (looping; Pillow, each frame its own 256-colour palette,
    so the few pixels of a legend's colours keep them) or an MP4 (imageio).

    The last frame stays ``hold_last`` times as long as the others (the answer).

    Raises ``RuntimeError`` with an install hint when imageio (or its ffmpeg plugin) is missing
    for an MP4.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".gif", ".mp4"):
        raise ValueError(f"animation must be .gif or .mp4, got {path.name}")
    frames = [np.ascontiguousarray(np.asarray(f)[..., :3]) for f in frames]
    if not frames:
        raise ValueError("no frames to write")
    h = min(f.shape[0] for f in frames)
    w = min(f.shape[1] for f in frames)
    if suffix == ".mp4":
        h, w = h - h % 2, w - w % 2  # yuv420p wants even sizes
    frames = [f[:h, :w] for f in frames]
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".gif":
        durations = [round(1000.0 / fps)] * len(frames)
        durations[-1] *= max(1, hold_last)
        pil = [_gif_frame(f) for f in frames]
        pil[0].save(path, save_all=True, append_images=pil[1:], duration=durations if len(pil) > 1 else durations[0],
                    loop=0)
    else:
        try:
            import imageio.v2 as imageio
            import imageio_ffmpeg  # noqa: F401
        except ImportError:
            raise RuntimeError("MP4 export needs imageio-ffmpeg: pip install 'napari-glimpse[video]'") from None
        imageio.mimsave(path, frames + [frames[-1]] * (max(1, hold_last) - 1), fps=fps, macro_block_size=1)
    return path
