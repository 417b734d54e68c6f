"""`blip summary`: the headline figure of every stage, one row per pretraining, for `dvc metrics show`.

`dvc metrics show` puts every metrics file in one table whose columns are all keys of all files (about 90, lines
of 1,500 characters). `dvc metrics show metrics/summary` reads these two files instead: a row for the model
pretrained on the web pairs (`pretrain`) and one for the model re-pretrained on the CapFilt pairs (`capfilt`),
with one column per stage, so the effect of CapFilt on every task reads at a glance in 120 columns.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from blip.config import ConfigError
from blip.stages.common import parse_stage_args, stage_parser, write_metrics

FOLDER = Path("metrics/summary")
# column -> (metrics file of the @pretrain row, of the @capfilt row, its key, scale to percent), named short to fit
# 120 columns: pretrain_R1 = held-out image->text ITC R@1 after (re-)pretraining, *_R = BLIP's R_mean (the mean of
# the six recalls), all in percent.
HEADLINES = {
    "pretrain_R1": ("pretrain", "repretrain", "eval_i2t_r1", 100.0),
    "zeroshot_R": ("retrieval_zeroshot", "retrieval_zeroshot_capfilt", "r_mean", 1.0),
    "retrieval_R": ("retrieval", "retrieval_capfilt", "r_mean", 1.0),
    "CIDEr": ("caption", "caption_capfilt", "CIDEr", 1.0),
    "VQA_acc": ("vqa", "vqa_capfilt", "rank_accuracy", 1.0),
    "NLVR2_acc": ("nlvr", "nlvr_capfilt", "accuracy", 1.0),
}


def headline(stem: str, key: str, scale: float, folder: Path) -> float | None:
    """The figure, or None where the stage recorded it as unavailable (null: e.g. CIDEr without Java)."""
    path = folder / f"{stem}.json"
    if not path.is_file():
        raise ConfigError(f"summary: {path} is missing (run its stage first: `dvc repro`)")
    metrics = json.loads(path.read_text())
    if key in metrics and metrics[key] is None:
        return None
    if not isinstance(metrics.get(key), int | float):
        raise ConfigError(f"summary: {path} has no number {key!r}")
    return round(float(metrics[key]) * scale, 4)


def summarise(folder: Path = Path("metrics")) -> dict[str, dict[str, float | None]]:
    """variant -> column -> value."""
    rows: dict[str, dict[str, float | None]] = {"pretrain": {}, "capfilt": {}}
    for column, (web, bootstrapped, key, scale) in HEADLINES.items():
        rows["pretrain"][column] = headline(web, key, scale, folder)
        rows["capfilt"][column] = headline(bootstrapped, key, scale, folder)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parse_stage_args(stage_parser("summary", __doc__ or ""), argv)
    for variant, row in summarise().items():
        write_metrics(variant, row, FOLDER)
        print(f"summary {variant}: " + ", ".join(f"{k}={'n/a' if v is None else f'{v:.4g}'}" for k, v in row.items()))
    return 0
