"""The figures people read: CapFilt's score histogram and gallery, the caption gallery, the training curves.
They are checked through the Figure objects (artists, colours, limits, titles), not by looking at pixels."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from matplotlib.colors import same_color
from matplotlib.figure import Figure
from matplotlib.text import Text
from PIL import Image

from blip.capfilt.report import (
    DROPPED,
    KEPT,
    capfilt_gallery,
    gallery_figure,
    histogram_figure,
    rule_text,
    score_histogram,
)
from blip.capfilt.units import UnitStats
from blip.config.tasks import CapfiltConfig
from blip.data.shards import ShardWriter
from blip.eval import captioning
from blip.tracking.plots import history_figure

LONG = "a small green diamond below a small yellow triangle to the right of a large red square at the top"
CALIBRATED = CapfiltConfig(
    score="itc", threshold_rule="calibrated", calibration_keep=0.9, calibration_split="clean_val"
)


def texts(figure: Figure) -> list[Text]:
    return [t for t in figure.findobj(Text) if t.get_text()]


def flat(text: str) -> str:
    return " ".join(text.split())  # wrapped lines back to one


def example(key: str) -> dict:
    """A web caption kept by ITC despite a low ITM, and a synthetic one dropped despite a high ITM."""
    return {"key": key, "pairs": [{"origin": "web", "caption": f"{LONG} {key}", "itm": 0.28, "itc": 0.31, "kept": True},
                                  {"origin": "synthetic", "caption": f"{key} caption", "itm": 0.55, "itc": 0.12,
                                   "kept": False}]}  # fmt: skip


def test_gallery_shows_whole_captions_coloured_by_decision_and_the_rule() -> None:
    examples = [example(f"k{i}") for i in range(5)]
    images = {e["key"]: Image.new("RGB", (8, 8)) for e in examples}
    figure = gallery_figure(examples, images, 0.238, CALIBRATED)
    artists = texts(figure)
    assert not any("[...]" in t.get_text() for t in artists)
    for e in examples:
        for pair in e["pairs"]:
            (artist,) = [t for t in artists if pair["caption"] in flat(t.get_text())]
            assert same_color(artist.get_color(), KEPT if pair["kept"] else DROPPED)
            assert ("KEPT" if pair["kept"] else "DROPPED") in artist.get_text()
    decisions = [flat(t.get_text()) for t in artists if LONG in flat(t.get_text())]
    assert all("ITC 0.310 >= 0.238" in d for d in decisions)  # the deciding score, compared with the threshold
    title = figure.get_suptitle()
    assert "kept if ITC >= 0.238" in title and "90% of the held-out human pairs of clean_val" in title
    assert str(CALIBRATED.filter) in title and str(CALIBRATED.captioner) in title
    legend = {t.get_text(): h for t, h in zip(figure.legends[0].get_texts(), figure.legends[0].legend_handles,
                                              strict=True)}  # fmt: skip
    assert same_color(legend["KEPT"].get_facecolor(), KEPT) and same_color(legend["DROPPED"].get_facecolor(), DROPPED)


def test_rule_names_fixed_thresholds_and_the_no_filter_ablation() -> None:
    assert rule_text(0.5, CapfiltConfig(score="itm")) == "kept if ITM >= 0.500 (fixed threshold)"
    assert rule_text(0.5, CapfiltConfig(use_filter=False)) == "no filter (ablation): every pair kept"


def stats_with(itm: list[float], itc: list[float]) -> list[UnitStats]:
    scores = {origin: {"itm": itm, "itc": itc} for origin in ("web", "synthetic")}
    return [UnitStats(0, "unit.tar", scores=scores)]


@pytest.mark.parametrize("threshold", [0.3, 0.62])  # inside the data, and beyond it (the axis stretches)
def test_histogram_fits_the_data_and_draws_the_threshold(threshold: float) -> None:
    itc = [0.1, 0.2, 0.3, 0.4, 0.5]
    figure = histogram_figure(stats_with([0.2, 0.6], itc), threshold, CALIBRATED)
    itm_axis, itc_axis = figure.axes
    low, high = min(*itc, threshold), max(*itc, threshold)
    margin = 0.1 * (high - low)
    left, right = itc_axis.get_xlim()
    assert low - margin <= left < low and high < right <= high + margin
    (line,) = [x for x in itc_axis.get_lines() if x.get_label().startswith("threshold")]
    assert list(line.get_xdata()) == [threshold, threshold] and f"{threshold:.3f}" in line.get_label()
    assert "decides" in itc_axis.get_title() and "not used" in itm_axis.get_title()
    assert not itm_axis.get_lines() and 0.15 <= itm_axis.get_xlim()[0] < 0.2  # ITM does not decide: no line
    assert str(CALIBRATED.filter) in figure.get_suptitle() and "web" in figure.get_suptitle()


def test_reports_written_as_png_with_images_from_the_shards(tmp_path: Path) -> None:
    writer = ShardWriter(tmp_path / "web", 10)
    for key in ("a", "b"):
        jpg = io.BytesIO()
        Image.new("RGB", (16, 16), "red").save(jpg, "JPEG")
        writer.write(key, {"jpg": jpg.getvalue()})
    writer.close()
    stats = stats_with([0.2, 0.6], [0.1, 0.5])
    stats[0].source = str(next((tmp_path / "web").glob("*.tar")))
    stats[0].examples = [example("a"), example("b")]
    for path in (capfilt_gallery(stats, tmp_path / "g.png", 0.2, CALIBRATED),
                 score_histogram(stats, tmp_path / "s.png", 0.2, CALIBRATED)):  # fmt: skip
        assert Image.open(path).format == "PNG"


def test_caption_gallery_title_names_model_and_split() -> None:
    predictions = {"i1": "a red square", "i2": "a blue circle"}
    references = {i: ["a human caption", "another"] for i in predictions}
    pixels = {i: torch.zeros(3, 8, 8) for i in predictions}
    figure = captioning.gallery_figure(predictions, references, pixels, 2, "caption_capfilt (m.safetensors)", "test")
    title = figure.get_suptitle()
    assert "caption_capfilt (m.safetensors)" in title and "of test" in title


def test_learning_rate_panel_claims_no_schedule_it_was_not_told() -> None:
    history = [{"step": s, "loss": 1.0 / s, "lr": 2e-4 if s < 80 else 1e-4} for s in range(10, 160, 10)]
    right = history_figure(history, "caption fine-tune").axes[1]
    assert right.get_title() == "learning rate at each logged step"
    assert list(right.get_lines()[0].get_ydata()) == [row["lr"] for row in history]
    told = history_figure(history, "caption fine-tune", "cosine to 0 over 2 epochs, set once per epoch").axes[1]
    assert flat(told.get_title()) == "learning rate: cosine to 0 over 2 epochs, set once per epoch"
