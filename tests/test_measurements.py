"""Clinical measurements (napari_glimpse.measurements): hand-computed geometry, signs, facing,
boundaries, ISBI ground truth against an independent computation, and the agreement scores."""

import math
import subprocess
import sys

import numpy as np
import pytest
from conftest import REAL_DATA

from napari_glimpse.errors import GlimpseError
from napari_glimpse.measurements import (
    MEASUREMENTS,
    NORMS,
    agreement,
    agreement_table,
    classify,
    classify_batch,
    facing_of,
    measure,
    measure_and_classify,
    measure_batch,
)

IDX = {name: i for i, name in enumerate(
    ["S", "N", "Or", "Po", "A", "B", "Pog", "Me", "Gn", "Go", "LIT", "UIT", "UL", "LL", "Sn", "SPog",
     "PNS", "ANS", "Ar"])}

# A plausible right-facing patient (pixels, roughly ISBI 151); tests override the points they need.
BASE = {
    "S": (800, 1000), "N": (1400, 900), "Or": (1250, 1150), "Po": (600, 1200), "A": (1350, 1500),
    "B": (1300, 1850), "Pog": (1300, 2000), "Me": (1250, 2050), "Gn": (1290, 2030), "Go": (750, 1700),
    "LIT": (1330, 1680), "UIT": (1360, 1700), "UL": (1450, 1650), "LL": (1440, 1800), "Sn": (1450, 1450),
    "SPog": (1400, 2050), "PNS": (850, 1450), "ANS": (1400, 1430), "Ar": (700, 1350),
}


def patient(**points) -> np.ndarray:
    """(19, 2) landmarks: :data:`BASE` with the named points replaced."""
    d = {**BASE, **points}
    return np.array([d[k] for k in IDX], dtype=float)


def mirror(c: np.ndarray, width: float = 1935) -> np.ndarray:
    out = np.array(c, dtype=float)
    out[..., 0] = width - 1 - out[..., 0]
    return out


# --- hand-computed cases --------------------------------------------------------------------------

def test_sna_snb_anb_right_angles_and_sign():
    # N at the origin, S straight behind: SNA = 90 with A straight below N
    c = patient(S=(900, 1000), N=(1000, 1000), A=(1000, 1100), B=(900, 1100))
    v = measure(c)
    assert v["SNA"] == pytest.approx(90)
    assert v["SNB"] == pytest.approx(45)
    assert v["ANB"] == pytest.approx(45)
    # B in front of A: SNB = 135, ANB = -45 (signed), skeletal Class III
    v = measure_and_classify(patient(S=(900, 1000), N=(1000, 1000), A=(1000, 1100), B=(1100, 1100)))
    assert v["SNB"][0] == pytest.approx(135)
    assert v["ANB"] == (pytest.approx(-45), 3)


def test_fhi_known_ratios_and_boundaries():
    base = {"S": (800, 1000), "N": (1000, 1000), "Me": (1000, 2000)}
    assert measure(patient(Go=(800, 1700), **base))["FHI"] == pytest.approx(0.7)
    # exactly on the boundaries: normal
    for go_y, cls in ((1650, 1), (1750, 1), (1649, 3), (1751, 2)):
        v, k = measure_and_classify(patient(Go=(800, go_y), **base))["FHI"]
        assert k == cls, (go_y, v)
    # spacing does not change a ratio
    c = patient(Go=(800, 1700), **base)
    assert measure(c, spacing=0.37)["FHI"] == pytest.approx(0.7)


def test_fma_is_sn_against_gogn():
    c = patient(S=(800, 1000), N=(1000, 1000), Go=(800, 1700), Gn=(800 + 300, 1700 + 300 * math.tan(math.radians(30))))
    assert measure(c)["FMA"] == pytest.approx(30)
    assert measure_and_classify(patient(S=(800, 1000), N=(1000, 1000), Go=(800, 1700), Gn=(900, 1800)))["FMA"] == (
        pytest.approx(45), 2)


def test_mw_sign_distance_and_spacing():
    # 3-4-5 triangle: 50 px apart, UIT in front of LIT: +5 mm (large overjet)
    c = patient(UIT=(1330, 1700), LIT=(1300, 1740))
    assert measure_and_classify(c)["MW"] == (pytest.approx(5.0), 4)
    assert measure(c, spacing=0.05)["MW"] == pytest.approx(2.5)
    # UIT behind LIT: negative, anterior crossbite
    c = patient(UIT=(1300, 1700), LIT=(1330, 1740))
    assert measure_and_classify(c)["MW"] == (pytest.approx(-5.0), 3)
    # same x: positive (the code negates only when x(UIT) < x(LIT)); 3 mm normal
    assert measure_and_classify(patient(UIT=(1300, 1700), LIT=(1300, 1730)))["MW"] == (pytest.approx(3.0), 1)
    # tips on top of each other: exactly 0, edge-to-edge
    assert measure_and_classify(patient(UIT=(1300, 1700), LIT=(1300, 1700)))["MW"] == (0.0, 2)


def test_odi_hand_computed():
    t = math.tan(math.radians(10))
    # T1: Me->Go straight back, B->A straight up: 90. PP-FH: FH horizontal, ANS tilted up 10 deg: -10
    common = {"Me": (1200, 2000), "Go": (800, 2000), "A": (1300, 1500), "B": (1300, 1800), "Po": (600, 1200),
              "Or": (1200, 1200), "PNS": (800, 1450)}
    up = patient(ANS=(1300, 1450 - 500 * t), **common)
    down = patient(ANS=(1300, 1450 + 500 * t), **common)
    assert measure_and_classify(up)["ODI"] == (pytest.approx(80), 1)
    assert measure_and_classify(down)["ODI"] == (pytest.approx(100), 2)


def test_apdi_hand_computed():
    # P1: Or->Po straight back, N->Pog straight down: 90. P2: A->B down and back at 45 deg, B behind A: -45.
    # P3: PP parallel to FH: 0.
    c = patient(Or=(1200, 1200), Po=(600, 1200), N=(1300, 900), Pog=(1300, 2000), A=(1350, 1500),
                B=(1250, 1600), PNS=(800, 1450), ANS=(1300, 1450))
    v, k = measure_and_classify(c)["APDI"]
    assert v == pytest.approx(45) and k == 2  # < 77.6: Class II tendency
    # B in front of A: +45, so 135, Class III tendency
    c = patient(Or=(1200, 1200), Po=(600, 1200), N=(1300, 900), Pog=(1300, 2000), A=(1350, 1500),
                B=(1450, 1600), PNS=(800, 1450), ANS=(1300, 1450))
    assert measure_and_classify(c)["APDI"] == (pytest.approx(135), 3)


# --- facing, batch, integer pixels ----------------------------------------------------------------

def test_mirrored_patient_same_values_and_classes():
    c = patient()
    assert facing_of(c).tolist() == [1.0]
    assert facing_of(mirror(c)).tolist() == [-1.0]
    a, b = measure(c), measure(mirror(c))
    assert a == pytest.approx(b, abs=1e-9)
    assert classify_batch(list(a.values())).tolist() == classify_batch(list(b.values())).tolist()
    # MW's sign survives mirroring both ways
    for uit_x in (1300, 1360):
        c = patient(UIT=(uit_x, 1700), LIT=(1330, 1740))
        assert measure(mirror(c))["MW"] == pytest.approx(measure(c)["MW"])
    # forcing the facing: a mirrored patient read as facing left is the original
    assert measure(mirror(c), facing="left") == pytest.approx(measure(c, facing="right"), abs=1e-9)
    assert measure(c, facing="left")["MW"] == pytest.approx(-measure(c)["MW"])


def test_batch_matches_single_and_shapes():
    rng = np.random.default_rng(0)
    batch = patient()[None] + rng.normal(0, 20, size=(5, 19, 2))
    v = measure_batch(batch)
    assert v.shape == (5, 8)
    for i in range(5):
        assert list(measure(batch[i]).values()) == pytest.approx(v[i].tolist())
    assert classify_batch(v).shape == (5, 8)
    assert measure_batch(batch[0]).shape == (1, 8)
    with pytest.raises(GlimpseError, match="19, 2"):
        measure_batch(np.zeros((5, 18, 2)))
    with pytest.raises(GlimpseError):
        measure(batch)
    with pytest.raises(GlimpseError, match="facing"):
        measure(batch[0], facing="up")


def test_integer_pixels_truncates_like_the_challenge_code():
    c = patient() + np.linspace(0.1, 0.9, 38).reshape(19, 2)
    assert measure(c, integer_pixels=True) == pytest.approx(measure(np.trunc(c)))
    assert measure(c) != pytest.approx(measure(np.trunc(c)))


def test_degenerate_landmarks_are_not_measurable():
    v = measure_and_classify(patient(A=BASE["N"]))
    assert math.isnan(v["SNA"][0]) and v["SNA"][1] == 0
    assert v["FHI"][1] != 0  # the others stay measurable


def test_import_is_cheap():
    code = ("import sys, napari_glimpse.measurements; "
            "bad = [m for m in ('torch', 'qtpy', 'napari', 'PyQt5', 'skimage') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


# --- classes ------------------------------------------------------------------------------------

def test_boundaries_are_normal_and_outside_classes():
    for name, norm in NORMS.items():
        assert classify(name, norm.low) == 1
        assert classify(name, norm.high) == 1
        assert classify(name, (norm.low + norm.high) / 2) == 1
        if name != "MW":
            assert classify(name, norm.high + 1e-9) == norm.above
            assert classify(name, norm.low - 1e-9) == norm.below
            assert {norm.above, norm.below} == {2, 3}
        assert classify(name, float("nan")) == 0
    # C2 means "above" for ANB, SNA, ODI, FHI, FMA and "below" for SNB, APDI
    assert [NORMS[m].above for m in MEASUREMENTS[:7]] == [2, 3, 2, 2, 3, 2, 2]
    assert [classify("MW", x) for x in (0.0, 1.0, -0.5, 1.999, 4.5001, 10)] == [2, 3, 3, 3, 4, 4]


# --- ISBI ground truth ----------------------------------------------------------------------------

def _line_angle(p, q):
    """Direction of p->q in degrees, y up (image y points down)."""
    return math.degrees(math.atan2(-(q[1] - p[1]), q[0] - p[0]))


def _diff(a, b):
    """a - b wrapped to (-180, 180]."""
    d = (a - b) % 360
    return d - 360 if d > 180 else d


def independent(c, spacing=0.1):
    """The eight values from line directions (atan2), written independently of the module."""
    P = {k: c[i] for k, i in IDX.items()}
    ang = lambda p, q, r, s: abs(_diff(_line_angle(p, q), _line_angle(r, s)))
    sna, snb = ang(P["N"], P["S"], P["N"], P["A"]), ang(P["N"], P["S"], P["N"], P["B"])
    tilt = _diff(_line_angle(P["PNS"], P["ANS"]), _line_angle(P["Po"], P["Or"]))  # > 0: ANS up
    pp_fh = -abs(tilt) if tilt > 0 else abs(tilt)
    odi = ang(P["Me"], P["Go"], P["B"], P["A"]) + pp_fh
    b_behind = _diff(_line_angle(P["A"], P["B"]), _line_angle(P["N"], P["Pog"])) < 0  # AB turned back
    ab = ang(P["N"], P["Pog"], P["A"], P["B"])
    apdi = ang(P["Or"], P["Po"], P["N"], P["Pog"]) + (-ab if b_behind else ab) + pp_fh
    fhi = math.dist(P["S"], P["Go"]) / math.dist(P["N"], P["Me"])
    fma = ang(P["S"], P["N"], P["Go"], P["Gn"])
    mw = math.dist(P["UIT"], P["LIT"]) * spacing * (-1 if P["UIT"][0] < P["LIT"][0] else 1)
    return [sna - snb, snb, sna, odi, apdi, fhi, fma, mw]


@pytest.fixture(scope="module")
def isbi_test1():
    if not REAL_DATA.is_dir():
        pytest.skip(f"ISBI 2015 data not at {REAL_DATA}")
    from napari_glimpse.io import read_landmarks_csv

    names, senior = read_landmarks_csv(REAL_DATA / "test1_senior.csv")
    names_j, junior = read_landmarks_csv(REAL_DATA / "test1_junior.csv")
    assert names == names_j
    return names, senior, junior


def test_isbi_ground_truth_against_independent_computation(isbi_test1):
    names, senior, junior = isbi_test1
    mean = (senior + junior) / 2
    values = measure_batch(mean)
    for i in (0, 1, 57, 149):
        assert values[i].tolist() == pytest.approx(independent(mean[i]), abs=1e-9), names[i]
        assert classify_batch(values[i]).tolist() == classify_batch(independent(mean[i])).tolist()
    # image 151 by hand: incisor tips (senior+junior)/2, MW = distance * 0.1 with the sign of x(UIT) - x(LIT)
    uit, lit = mean[0, 11], mean[0, 10]
    mw = math.hypot(*(uit - lit)) * 0.1 * (1 if uit[0] >= lit[0] else -1)
    assert values[0, 7] == pytest.approx(mw)
    # every ISBI patient faces +x; the mirrored set gives the same classes
    assert (facing_of(mean) == 1).all()
    assert (classify_batch(measure_batch(mirror(mean))) == classify_batch(values)).all()
    # all classes of each measurement occur (MW: all but the edge-to-edge class)
    cls = classify_batch(measure_batch(mean, integer_pixels=True))
    for j, name in enumerate(MEASUREMENTS):
        expected = {1, 3, 4} if name == "MW" else {1, 2, 3}
        assert set(cls[:, j]) == expected, name


# --- agreement ----------------------------------------------------------------------------------

def test_agreement_on_a_known_confusion():
    res = agreement([1, 1, 2, 3, 3, 3], [1, 2, 2, 3, 3, 1])
    assert res["confusion"] == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]
    assert res["recall"] == {"1": 0.5, "2": 1.0, "3": pytest.approx(2 / 3)}
    assert res["mean_recall"] == pytest.approx((0.5 + 1 + 2 / 3) / 3)
    assert res["mpa_score"] == pytest.approx(res["mean_recall"])
    assert res["accuracy"] == pytest.approx(4 / 6)


def test_agreement_with_a_class_missing_from_the_truth():
    res = agreement([1, 1, 2, 2], [1, 1, 2, 3])
    assert res["recall"]["3"] is None
    assert res["mean_recall"] == pytest.approx(0.75)  # mean over the classes present
    assert res["mpa_score"] == pytest.approx(0.5)  # the challenge code: (1 + 0.5 + 0) / 3
    # MW's four classes, class 2 absent: same as mpa
    res = agreement([1, 3, 4, 4], [1, 3, 4, 1], classes=(1, 2, 3, 4))
    assert res["mean_recall"] == pytest.approx((1 + 1 + 0.5) / 3) == res["mpa_score"]
    assert np.array(res["confusion"]).shape == (4, 4)
    # a prediction that is not measurable (0) is a miss
    assert agreement([1, 2], [0, 2])["accuracy"] == 0.5
    with pytest.raises(GlimpseError):
        agreement([1, 2], [1])


def test_agreement_table():
    t = np.array([[1, 1, 1, 1, 1, 1, 1, 1], [2, 2, 2, 2, 2, 2, 2, 4], [3, 3, 3, 3, 3, 3, 3, 3]])
    p = t.copy()
    p[0, 7] = 3
    tab = agreement_table(t, p)
    assert set(tab) == set(MEASUREMENTS) | {"average"}
    assert tab["ANB"]["mean_recall"] == 1.0 and tab["MW"]["accuracy"] == pytest.approx(2 / 3)
    assert tab["average"]["accuracy"] == pytest.approx((7 + 2 / 3) / 8)
    with pytest.raises(GlimpseError):
        agreement_table(t, p[:, :7])


def test_benchmark_compares_the_pairs_it_reports():
    from conftest import load_benchmark

    bench = load_benchmark("measurements")
    rng = np.random.default_rng(0)
    c = {k: rng.integers(1, 4, size=(10, 8)) for k in ("model", "senior", "junior", "mean")}
    res = bench.compare(c)
    assert res["junior_vs_senior"] == agreement_table(c["senior"], c["junior"])  # senior is the reference
    assert res["model_vs_mean"] == agreement_table(c["mean"], c["model"])
    text = bench.summary_table({"integer_pixels": res})
    assert "average" in text and "83.4 %" in text
