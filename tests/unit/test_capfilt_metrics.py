"""CapFilt's measured figures from the units' stats (the synthetic world's labels, for measuring only)."""

from __future__ import annotations

import pytest

from blip.capfilt.report import capfilt_metrics
from blip.capfilt.units import UnitStats
from blip.config.tasks import CapfiltConfig


def test_synthetic_captions_truth_rates_and_how_well_the_filter_ranks_them() -> None:
    # Four synthetic captions, two true of their image: ITC puts 0.2 (true) below 0.3 (false), ITM orders all.
    synthetic = {"itm": [0.9, 0.1, 0.8, 0.2], "itc": [0.5, 0.1, 0.2, 0.3]}
    web = {"itm": [0.7, 0.3], "itc": [0.4, 0.0]}
    stats = UnitStats(0, "unit.tar", scores={"web": web, "synthetic": synthetic}, noisy=[False, True],
                      noise=[None, "unrelated"], synthetic_true=[True, False, True, False])  # fmt: skip
    metrics = capfilt_metrics([stats], 0.25, CapfiltConfig(score="itc"))
    assert metrics["synthetic_true"] == 0.5
    assert metrics["synthetic_kept_true"] == pytest.approx(0.5)  # ITC >= 0.25 keeps 0.5 (true) and 0.3 (false)
    assert metrics["filter_auc_synthetic_itm"] == 1.0  # ITM puts both true captions first
    assert metrics["filter_auc_synthetic_itc"] == pytest.approx(0.75)  # 3 of the 4 (true, false) pairs in order
    assert metrics["filter_auc_itc"] == 1.0  # the noisy web caption scores lowest


def test_no_synthetic_auc_when_every_caption_is_false() -> None:
    stats = UnitStats(0, "u", scores={"web": {"itm": [], "itc": []}, "synthetic": {"itm": [0.2], "itc": [0.1]}},
                      synthetic_true=[False])  # fmt: skip
    metrics = capfilt_metrics([stats], 0.5, CapfiltConfig(score="itm"))
    assert metrics["synthetic_true"] == 0.0 and "filter_auc_synthetic_itm" not in metrics
