"""`blip capfilt`: CapFilt, BLIP's dataset bootstrapping (the algorithm: `blip.capfilt`).

The output (`capfilt.out_dir/bootstrapped`) holds the human-annotated pairs as they were, the kept web pairs and
the kept synthetic pairs, one caption per sample, each record marked with its `origin`; beside it `manifest.json`
(counts, score histograms, the threshold). reports/capfilt/ holds the score histogram and a gallery of examples
(image, web and synthetic captions, scores, kept or not). Work is split into units, one per input shard, resumable
after a kill; under torchrun the units are dealt out to ranks, and within a unit data-loader workers decode images.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from blip.capfilt.bootstrap import Bootstrapper, load_models
from blip.capfilt.report import capfilt_gallery, capfilt_metrics, score_counts, score_histogram
from blip.capfilt.units import (
    SPLIT,
    Unit,
    assemble,
    commit,
    fingerprint,
    is_done,
    plan_units,
    prepare_work_dir,
    read_stats,
)
from blip.config import Params
from blip.distributed import barrier, setup, teardown
from blip.stages.common import parse_stage_args, stage_parser, write_metrics
from blip.tracking import stage_run


def main(argv: Sequence[str] | None = None) -> int:
    _, params = parse_stage_args(stage_parser("capfilt", __doc__ or ""), argv)
    cfg = params.capfilt
    ctx = setup()
    try:
        bootstrapper = Bootstrapper(params, load_models(params, ctx.device), ctx.device)
        units = plan_units(params)
        if ctx.is_main:
            prepare_work_dir(cfg, fingerprint(params, bootstrapper.threshold, units))
        barrier(ctx)
        todo = [unit for unit in units[ctx.rank :: ctx.world_size] if not is_done(cfg, unit)]
        if ctx.is_main and len(todo) < len(units[:: ctx.world_size]):
            print(f"capfilt: resuming, {len(units) - len(todo) * ctx.world_size} units already done")
        for unit in tqdm(todo, desc=f"capfilt units (rank {ctx.rank})", position=ctx.rank):
            commit(cfg, bootstrapper.run(unit))
        barrier(ctx)
        if ctx.is_main:
            publish(params, units, bootstrapper.threshold)
    finally:
        teardown()
    return 0


def publish(params: Params, units: list[Unit], threshold: float) -> None:
    """Rank 0, once every unit is done: the output folder, its manifest, reports, metrics, the MLflow run."""
    cfg = params.capfilt
    stats = read_stats(cfg, units)
    metrics = capfilt_metrics(stats, threshold, cfg)
    manifest = {"split": SPLIT, "threshold": threshold, "rule": cfg.threshold_rule, "score": cfg.score,
                "units": len(units), "metrics": metrics, "histograms": score_counts(stats)}  # fmt: skip
    assemble(cfg, units, manifest)
    reports = Path("reports/capfilt")
    plots = [score_histogram(stats, reports / "scores.png", threshold, cfg),
             capfilt_gallery(stats, reports / "gallery.png", threshold, cfg)]  # fmt: skip
    captioner, kept_by = cfg.captioner if cfg.use_captioner else "off", cfg.filter if cfg.use_filter else "off"
    description = (f"CapFilt of {SPLIT}: captioner {captioner}, filter {kept_by} ({cfg.score} >= {threshold:.3g}, "
                   f"{cfg.threshold_rule} threshold)")  # fmt: skip
    with stage_run("capfilt", params, ("capfilt", "model", "tokenizer", "data"), description) as run:
        run.log_metrics(metrics)
        run.log_artifact(write_metrics("capfilt", metrics), "metrics.json")
        for artifact in (cfg.out_dir / "manifest.json", *plots):
            run.log_artifact(artifact)
    print("capfilt: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
