"""What the training stages share: the per-rank batch, the resumable training stream, resume, the final save."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import webdataset as wds

from blip.config import ConfigError, Params
from blip.config.schema import AugmentConfig, TrainConfig
from blip.data.loader import make_loader, train_pipeline
from blip.data.shards import shard_urls
from blip.data.transforms import train_transform
from blip.tracking import stage_run
from blip.tracking.plots import plot_history, write_history_csv
from blip.tracking.runs import StageRun
from blip.training.distributed import DistContext
from blip.training.loop import Compute, Trainer

PLOTS = Path("plots")


def per_rank_batch(stage: str, cfg: TrainConfig, ctx: DistContext) -> int:
    per_rank, remainder = divmod(cfg.batch_size, ctx.world_size * cfg.accumulation)
    if remainder or per_rank == 0:
        raise ConfigError(f"{stage}.batch_size {cfg.batch_size} does not split over {ctx.world_size} ranks x "
                          f"{cfg.accumulation} accumulation steps")  # fmt: skip
    return per_rank


def resume(stage: str, trainer: Trainer, cfg: TrainConfig) -> None:
    found = trainer.resume_from(cfg.checkpoint_dir) if cfg.resume == "auto" else None
    if found and trainer.ctx.is_main:
        print(f"{stage}: resuming from {found} (step {trainer.step})")


def training_batches(
    stage: str, params: Params, cfg: TrainConfig, splits: list[str], augment: AugmentConfig, trainer: Trainer
) -> wds.WebLoader:
    """The resumable training stream over `splits`, continuing from the trainer's data position."""
    urls = [url for split in splits for url in shard_urls(params.data.shard_root / split)]
    transform = train_transform(params.model.image_size, augment)
    pipeline = train_pipeline(urls, "pairs", transform, per_rank_batch(stage, cfg, trainer.ctx), seed=cfg.seed,
                              rank=trainer.ctx.rank, shuffle_buffer=params.data.shuffle_buffer,
                              resume=trainer.position)  # fmt: skip
    return make_loader(pipeline, params.data.num_workers)


def save_curves(stage: str, trainer: Trainer, run: StageRun, title: str) -> None:
    for artifact in (write_history_csv(trainer.history, PLOTS / f"{stage}.csv"),
                     plot_history(trainer.history, PLOTS / f"{stage}.png", title)):  # fmt: skip
        run.log_artifact(artifact)


def fit_and_finish(
    stage: str, params: Params, trainer: Trainer, batches: wds.WebLoader, compute: Compute,
    finish: Callable[[StageRun], None],
) -> None:  # fmt: skip
    """Train inside the stage's MLflow run (the same run again after a resume), then rank 0 runs `finish`."""
    with stage_run(stage, params, run_id=trainer.run_id) as run:
        trainer.run_id = trainer.run_id or run.run_id
        trainer.fit(batches, compute, run, samples_per_step=trainer.cfg.batch_size)
        if trainer.ctx.is_main:
            finish(run)
