"""The figures of benchmarks/filter_scores.py that are not plain ROC-AUC: ranking within one image, best-of-K
truth, and what a threshold keeps."""

from __future__ import annotations

import pytest
import torch

from benchmarks.filter_scores import report, within_image


def test_within_image_counts_true_above_false_pairs_of_mixed_images_only() -> None:
    values = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.8, 0.3], [0.4, 0.6, 0.7]])
    truth = torch.tensor([[True, False, False], [True, False, True], [False, False, False]])
    # Image 0: the true caption beats both false ones (1.0). Image 1: 0.2 and 0.3 against 0.8 (0.0). Image 2 has no
    # true caption and does not count.
    assert within_image(values, truth) == pytest.approx(0.5)
    assert within_image(values, torch.zeros_like(truth)) != within_image(values, torch.zeros_like(truth))  # NaN


def test_report_picks_the_best_per_image_and_keeps_at_the_threshold() -> None:
    values = torch.tensor([0.9, 0.1, 0.2, 0.8])  # two images, two captions each
    truth = torch.tensor([True, False, True, False])
    row = report(values, truth, ["Exists", "Exists", "Pair", "Pair"], threshold=0.5, per_image=2)
    assert row["picked true"] == 0.5  # image 0 picks its true caption, image 1 its false one
    assert row["kept"] == 0.5 and row["kept true"] == 0.5  # 0.9 (true) and 0.8 (false) reach 0.5
    assert row["auc"] == pytest.approx(0.75)  # true 0.9, 0.2 against false 0.1, 0.8: three of four pairs in order
    assert row["auc one object"] == 1.0 and row["auc two objects"] == 0.0
