#!/usr/bin/env python
"""Draw docs/measurements.png: the lines and angles of the 8 ISBI measurements on one cephalogram.

Usage: python scripts/measurements_figure.py [--data ../shared/data/isbi2015] [--image 151] [--out PNG]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from napari_glimpse.io import load_dataset
from napari_glimpse.measurements import MEASUREMENTS, NORMS, classify, measure

ROOT = Path(__file__).resolve().parents[1]
FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
BOLD = "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf"
IDX = {n: i for i, n in enumerate(["S", "N", "Or", "Po", "A", "B", "Pog", "Me", "Gn", "Go", "LIT", "UIT"])}
IDX.update(PNS=16, ANS=17)
# measurement -> (colour, the lines drawn for it, the formula shown in the legend)
STYLE = {
    "SNA": ((255, 150, 40), [("N", "A")], "angle S-N-A"),
    "SNB": ((60, 220, 255), [("N", "B")], "angle S-N-B"),
    "ANB": ((255, 255, 255), [("S", "N")], "SNA - SNB (signed)"),
    "ODI": ((255, 70, 70), [("Go", "Me"), ("A", "B")], "AB vs Go-Me + PP vs FH"),
    "APDI": ((120, 255, 90), [("N", "Pog")], "FH vs N-Pog + AB vs N-Pog + PP vs FH"),
    "FHI": ((170, 170, 255), [("S", "Go"), ("N", "Me")], "|S-Go| / |N-Me|"),
    "FMA": ((220, 110, 255), [("Go", "Gn")], "S-N vs Go-Gn (not FH vs MP)"),
    "MW": ((255, 60, 200), [("UIT", "LIT")], "|UIT-LIT|, < 0 if UIT behind"),
}
# label offsets (pixels) where the default (up right) would collide
LABEL_AT = {"B": (-28, -14), "Pog": (10, -12), "Gn": (10, 2), "Me": (-40, 4), "LIT": (-42, 0), "UIT": (10, -26),
            "A": (10, -12)}
PLANES = {"FH (Po-Or)": ((255, 230, 60), ("Po", "Or")), "PP (PNS-ANS)": ((60, 255, 200), ("PNS", "ANS"))}


def font(size: int, bold: bool = False):
    try:
        return ImageFont.truetype(BOLD if bold else FONT, size)
    except OSError:
        return ImageFont.load_default()


def line(d, p, q, colour, width=3, extend=0.0, dashed=False):
    p, q = np.asarray(p, float), np.asarray(q, float)
    v = q - p
    p, q = p - v * extend, q + v * extend
    if not dashed:
        d.line([tuple(p), tuple(q)], fill=colour, width=width)
        return
    n = max(int(np.linalg.norm(q - p) / 12), 1)
    for i in range(0, n, 2):
        d.line([tuple(p + (q - p) * i / n), tuple(p + (q - p) * (i + 1) / n)], fill=colour, width=width)


def arc(d, centre, a, b, r, colour, width=3):
    """The smaller arc at ``centre`` from direction ``a`` to direction ``b`` (points)."""
    t1 = math.degrees(math.atan2(a[1] - centre[1], a[0] - centre[0]))
    t2 = math.degrees(math.atan2(b[1] - centre[1], b[0] - centre[0]))
    if (t2 - t1) % 360 > 180:
        t1, t2 = t2, t1
    box = [centre[0] - r, centre[1] - r, centre[0] + r, centre[1] + r]
    d.arc(box, t1, t2, fill=colour, width=width)


def draw_overlay(img: Image.Image, P: dict, scale: float) -> None:
    d = ImageDraw.Draw(img)
    for colour, (a, b) in PLANES.values():
        line(d, P[a], P[b], colour, 3, extend=0.15)
    for name, (colour, segs, _) in STYLE.items():
        for a, b in segs:
            line(d, P[a], P[b], colour, 4 if name == "MW" else 3, extend=0.1 if name == "ANB" else 0.0,
                 dashed=name == "FHI")
    arc(d, P["N"], P["S"], P["A"], 110 * scale * 2, STYLE["SNA"][0], 4)
    arc(d, P["N"], P["S"], P["B"], 150 * scale * 2, STYLE["SNB"][0], 4)
    f = font(max(int(15 * scale * 2), 12), bold=True)
    for k, p in P.items():
        d.ellipse([p[0] - 5, p[1] - 5, p[0] + 5, p[1] + 5], fill=(255, 255, 0), outline=(0, 0, 0))
        dx, dy = LABEL_AT.get(k, (8, -20))
        d.text((p[0] + dx, p[1] + dy), k, fill=(255, 255, 0), font=f, stroke_width=2, stroke_fill=(0, 0, 0))


def legend(height: int, values: dict, width: int = 520) -> Image.Image:
    panel = Image.new("RGB", (width, height), (24, 24, 28))
    d = ImageDraw.Draw(panel)
    d.text((16, 14), "ISBI 2015 measurements (image 151,", fill="white", font=font(19, True))
    d.text((16, 38), "doctors' mean landmarks)", fill="white", font=font(19, True))
    y = 78
    for name in MEASUREMENTS:
        colour, _, formula = STYLE[name]
        v, norm = values[name], NORMS[name]
        k = classify(name, v)
        d.rectangle([16, y + 4, 44, y + 20], fill=colour)
        unit = norm.unit if norm.unit in ("", "°") else " " + norm.unit
        d.text((54, y), f"{name} = {v:.2f}{unit}", fill="white", font=font(19, True))
        d.text((54, y + 24), formula, fill=(200, 200, 200), font=font(15))
        flag = (255, 255, 255) if k == 1 else (255, 120, 120)
        d.text((54, y + 44), f"normal {norm.range_text()} → class {k}: {norm.labels[k]}", fill=flag, font=font(15))
        y += 74
    for label, (colour, _) in PLANES.items():
        d.rectangle([16, y + 4, 44, y + 20], fill=colour)
        d.text((54, y), label, fill="white", font=font(17))
        y += 28
    d.text((16, y + 6), "dashed: the FHI heights; arcs: SNA, SNB at N", fill=(200, 200, 200), font=font(15))
    return panel


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "isbi2015")
    p.add_argument("--image", default="151")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "measurements.png")
    a = p.parse_args()
    ds = load_dataset(a.data, "test1")
    i = [q.stem for q in ds.image_paths].index(a.image)
    lm = ds.ground_truth("mean")[i]
    values = measure(lm, ds.pixel_spacing)
    img = Image.open(ds.image_paths[i]).convert("RGB")
    pts = lm[list(IDX.values())]
    lo, hi = pts.min(0) - [120, 160], pts.max(0) + [160, 120]
    lo, hi = np.maximum(lo, 0), np.minimum(hi, [img.width - 1, img.height - 1])
    crop = img.crop((*lo.astype(int), *hi.astype(int)))
    scale = 1000 / crop.height
    crop = crop.resize((round(crop.width * scale), 1000), Image.LANCZOS)
    P = {k: (lm[j] - lo) * scale for k, j in IDX.items()}
    clean = crop.copy()
    draw_overlay(crop, P, scale)
    zoom_incisors(crop, clean, P)
    out = Image.new("RGB", (crop.width + 520, 1000))
    out.paste(crop, (0, 0))
    out.paste(legend(1000, values), (crop.width, 0))
    out.save(a.out, optimize=True)
    print(f"wrote {a.out} ({out.width}x{out.height})")


def zoom_incisors(img: Image.Image, clean: Image.Image, P: dict, r: int = 30, zoom: int = 4) -> None:
    """A 4x inset of the incisor tips (MW is a few mm), pasted at the bottom left."""
    c = (np.asarray(P["UIT"]) + np.asarray(P["LIT"])) / 2
    box = (int(c[0] - r), int(c[1] - r), int(c[0] + r), int(c[1] + r))
    inset = clean.crop(box).resize((2 * r * zoom, 2 * r * zoom), Image.LANCZOS)
    d = ImageDraw.Draw(inset)
    q = {k: ((np.asarray(P[k]) - box[:2]) * zoom).tolist() for k in ("UIT", "LIT")}
    d.line([tuple(q["UIT"]), tuple(q["LIT"])], fill=STYLE["MW"][0], width=4)
    for k, (x, y) in q.items():
        d.ellipse([x - 7, y - 7, x + 7, y + 7], fill=(255, 255, 0), outline=(0, 0, 0))
        at = (x + 14, y - 8) if k == "UIT" else (x - 52, y - 34)
        d.text(at, k, fill=(255, 255, 0), font=font(20, True), stroke_width=2, stroke_fill=(0, 0, 0))
    x0, y0 = 10, img.height - inset.height - 10
    img.paste(inset, (x0, y0))
    d = ImageDraw.Draw(img)
    d.rectangle([x0, y0, x0 + inset.width, y0 + inset.height], outline=STYLE["MW"][0], width=3)
    d.rectangle(box, outline=STYLE["MW"][0], width=2)
    d.text((x0 + 6, y0 + 4), "MW: incisor tips, x4", fill="white", font=font(16, True), stroke_width=2,
           stroke_fill=(0, 0, 0))


if __name__ == "__main__":
    main()
