"""training.plots writes valid PNG files of the expected size (no pixel comparisons)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.metrics import (
    auroc,
    bootstrap_ci,
    choose_threshold,
    detection_limit,
    reliability,
)
from training.plots import (
    _title,
    detection_limit_plot,
    reliability_plot,
    roc_plot,
    volume_scatter,
)


def _png(path: Path, size: tuple[int, int]) -> None:
    assert path.is_file() and path.stat().st_size > 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.size == size  # inches * 150 dpi
        assert im.info.get("dpi", (150, 150))[0] == pytest.approx(150, abs=1)


def _scores(n: int = 60) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], n // 2)
    return y, 1 / (1 + np.exp(-(rng.normal(size=n) + 1.5 * y - 0.75)))


def test_title_says_n_and_demonstration_data() -> None:
    assert _title("ROC", 12, synthetic=False) == "ROC (n=12)"
    assert _title("ROC", 12, synthetic=True) == "ROC (n=12) - demonstration data"


def test_roc_plot(tmp_path: Path) -> None:
    y, s = _scores()
    op = choose_threshold(y, s, rule="youden")
    ci = bootstrap_ci(auroc, y, s, n_boot=50)
    out = roc_plot(y, s, tmp_path / "sub" / "roc.png", operating_point=op, ci=ci, synthetic=True)
    assert out == tmp_path / "sub" / "roc.png"
    _png(out, (900, 750))


def test_roc_plot_of_one_class_still_writes_a_figure(tmp_path: Path) -> None:
    _png(roc_plot([0, 0, 0], [0.1, 0.2, 0.3], tmp_path / "roc.png"), (900, 750))


def test_reliability_plot(tmp_path: Path) -> None:
    y, s = _scores()
    curve = reliability(y, s, n_bins=10)
    _png(reliability_plot(curve, tmp_path / "rel.png", ece=curve.ece), (900, 975))
    _png(reliability_plot(curve, tmp_path / "rel2.png", ece=math.nan, synthetic=True), (900, 975))


def test_detection_limit_plot(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    volumes = rng.uniform(0.2, 40, 50)
    subtypes = rng.choice(["subdural", "intraparenchymal", "intraventricular"], 50)
    detected = rng.random(50) < np.clip(volumes / 10, 0.1, 0.95)
    table = detection_limit(volumes, subtypes, detected)
    _png(detection_limit_plot(table, tmp_path / "det.png", synthetic=True), (1050, 750))


def test_volume_scatter(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    true = rng.uniform(0, 50, 30)
    pred = true * rng.uniform(0.8, 1.2, 30)
    _png(volume_scatter(true, pred, tmp_path / "vol.png"), (1500, 750))
    _png(volume_scatter([], [], tmp_path / "empty.png"), (1500, 750))
    _png(volume_scatter([3.0], [2.5], tmp_path / "one.png"), (1500, 750))
    with pytest.raises(ValueError, match="one length"):
        volume_scatter([1.0], [1.0, 2.0], tmp_path / "bad.png")
