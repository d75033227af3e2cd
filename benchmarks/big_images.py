#!/usr/bin/env python
"""Peak memory of ``napari-glimpse predict`` on big cephalograms (100 and 180 megapixels).

ISBI 151 is enlarged to 10000 x 10000 and 15000 x 12000 pixels (JPEG, quality 90) in a temporary
folder and predicted by the CLI in a child process, with the spacing that makes it a 240 mm tall
film (so it is resampled to the model's 0.1 mm) and, for 180 MP, without one (read at 0.1 mm, a
notice). Peak RSS from ``resource.getrusage(RUSAGE_CHILDREN)``; results in
``benchmarks/results/big_images.json``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "isbi2015"
CASES = (("100 MP", (10000, 10000), 0.024), ("180 MP", (15000, 12000), 0.016), ("180 MP", (15000, 12000), None))

CHILD = """
import resource, subprocess, sys, time
t = time.perf_counter()
r = subprocess.run(sys.argv[1:], capture_output=True, text=True)
print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, time.perf_counter() - t)
print(r.stderr.strip().splitlines()[-1] if r.stderr.strip() else "")
"""


def main() -> int:
    import cv2  # the project's image dependency (OpenCV) writes the big JPEGs quickly

    src = cv2.imread(str(DATA / "images" / "151.jpg"), cv2.IMREAD_GRAYSCALE)
    tmp = Path(tempfile.mkdtemp(prefix="glimpse-big-"))
    rows = []
    for name, (h, w), spacing in CASES:
        path = tmp / f"{h}x{w}.jpg"
        if not path.exists():
            cv2.imwrite(str(path), cv2.resize(src, (w, h)), [cv2.IMWRITE_JPEG_QUALITY, 90])
        cmd = [sys.executable, "-m", "napari_glimpse", "predict", str(path), "--out", str(tmp / "p.csv")]
        cmd += ["--spacing", str(spacing)] if spacing else []
        out = subprocess.run([sys.executable, "-c", CHILD, *cmd], capture_output=True, text=True).stdout.splitlines()
        code, rss_kb, seconds = out[0].split()
        mp = h * w / 1e6
        rows.append({"image": name, "pixels": [h, w], "spacing_mm": spacing, "exit_code": int(code),
                     "peak_rss_mb": round(int(rss_kb) / 1024), "mb_per_megapixel": round(int(rss_kb) / 1024 / mp, 1),
                     "seconds": round(float(seconds), 1), "stderr_last_line": out[1] if len(out) > 1 else ""})
        print(json.dumps(rows[-1]), flush=True)
    res = {"cases": rows, "load_avg": os.getloadavg(), "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    out = Path(__file__).parent / "results" / "big_images.json"
    out.write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
