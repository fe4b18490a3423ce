"""python -m fastfuse.examples.tabular end to end on small slices: preprocessing, the fused model and its eager
twin trained side by side from the same weights, RMSPE. CI runs it on a CSV written here in txhousing's columns
(plotnine, which ships the real file, is not in CI's package index); where plotnine is installed, the real file's
first rows run too. python -m fastfuse.examples.vision on a slice of scikit-image's lfw_subset."""
import csv
import importlib.util
import math
import random

import pytest

from fastfuse.examples import tabular as example

COLUMNS = ["city", "year", "month", "sales", "volume", "median", "listings", "inventory", "date"]


def _check(results):
    assert set(results) == {"fused", "eager"}
    for seconds, rmspe in results.values():
        assert seconds > 0 and math.isfinite(rmspe) and 0 <= rmspe < 10
    # same weights, batches and dropout seeds: the two models end close (rounding differs, so not bit-equal)
    assert results["fused"][1] == pytest.approx(results["eager"][1], rel=0.05, abs=0.01)


def test_example_on_a_csv_of_txhousings_layout(tmp_path, capsys):
    rng = random.Random(0)
    path = tmp_path / "txhousing_slice.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for city in ["Abilene", "Amarillo", "Austin"]:
            base = rng.uniform(50, 500)
            for year in range(2012, 2016):
                for month in range(1, 13):
                    if year == 2015 and month > 7:
                        break
                    sales = "NA" if rng.random() < 0.03 else round(base * rng.uniform(0.7, 1.3))
                    listings = "NA" if rng.random() < 0.1 else round(base * 8 * rng.uniform(0.8, 1.2))
                    w.writerow([city, year, month, sales, 0, round(rng.uniform(1e5, 3e5)), listings,
                                round(rng.uniform(2, 8), 1), year + (month - 1) / 12])
    results = example.main(["--epochs", "2", "--bs", "16", "--csv", str(path)])
    out = capsys.readouterr().out
    assert "listings_na" in out and "valid RMSPE" in out and "fused speedup per epoch" in out
    _check(results)


@pytest.mark.skipif(importlib.util.find_spec("plotnine") is None, reason="plotnine (the real txhousing.csv) missing")
def test_example_on_the_first_rows_of_txhousing(capsys):
    results = example.main(["--epochs", "1", "--bs", "64", "--rows", "1200"])
    assert "valid RMSPE" in capsys.readouterr().out
    _check(results)


def test_vision_example_on_a_slice_of_lfw(tmp_path, capsys):
    """python -m fastfuse.examples.vision on 48 of lfw_subset's images, one epoch: the reflection-padded xresnet18
    and its eager twin train side by side from the same weights, and the Grad-CAM picture is written."""
    from fastfuse.examples import vision  # scikit-image and matplotlib: the test extra has them

    png = tmp_path / "gradcam.png"
    results = vision.main(["--epochs", "1", "--limit", "48", "--bs", "16", "--png", str(png)])
    out = capsys.readouterr().out
    assert "38 training and 10 validation images" in out and "fused speedup per epoch" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(results) == {"fused", "eager"}
    for seconds, acc, loss in results.values():
        assert seconds > 0 and 0 <= acc <= 1 and math.isfinite(loss)
    # same weights and batches: two steps apart only by rounding
    assert results["fused"][2] == pytest.approx(results["eager"][2], rel=1e-3)
