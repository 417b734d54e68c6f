"""What the training stages share: the per-rank batch, the resumable training stream, resume, the final save."""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
import webdataset as wds
from torch import nn
from transformers import PreTrainedTokenizer

from blip.config import ConfigError, Params
from blip.config.schema import AugmentConfig, TrainConfig
from blip.config.tasks import FinetuneConfig
from blip.data.loader import make_loader, train_pipeline
from blip.data.shards import shard_urls
from blip.data.tokenizer import load_tokenizer
from blip.data.transforms import train_transform
from blip.models.checkpoint import load_official
from blip.models.factory import build_model, describe, read_weights
from blip.models.import_hf import is_transformers_folder, read_folder
from blip.tracking import stage_run
from blip.tracking.plots import plot_history, write_history_csv
from blip.tracking.runs import StageRun
from blip.training.distributed import DistContext
from blip.training.loop import Compute, Trainer
from blip.training.optim import cosine_lr

PLOTS = Path("plots")


def per_rank_batch(stage: str, cfg: TrainConfig, ctx: DistContext) -> int:
    per_rank, remainder = divmod(cfg.batch_size, ctx.world_size * cfg.accumulation)
    if remainder or per_rank == 0:
        raise ConfigError(f"{stage}.batch_size {cfg.batch_size} does not split over {ctx.world_size} ranks x "
                          f"{cfg.accumulation} accumulation steps")  # fmt: skip
    return per_rank


def _head_digest(path: Path) -> bytes:
    if path.is_dir():  # a transformers folder: each of its files
        return b"".join(_head_digest(p) for p in sorted(path.rglob("*")) if p.is_file())
    with path.open("rb") as f:  # name, size and the first MiB: cheap even for a web-scale shard list
        return hashlib.sha256(f"{path.name}:{path.stat().st_size}".encode() + f.read(1 << 20)).digest()


def run_fingerprint(params: Params, cfg: TrainConfig) -> str:
    """What a training run's checkpoints depend on: its settings, model, tokenizer, training shards and initial
    weights. DVC reruns a stage when any of these changed; resuming the old run's checkpoint would then silently
    mix two runs (or skip training altogether)."""
    operational = {"name", "log_every", "checkpoint_every", "keep_checkpoints", "checkpoint_dir", "resume", "output"}
    digest = hashlib.sha256(cfg.model_dump_json(exclude=operational).encode())
    for section in (params.model, params.data, params.tokenizer):
        digest.update(section.model_dump_json().encode())
    root = cfg.shard_root or params.data.shard_root
    files = [Path(url) for split in cfg.splits for url in shard_urls(root / split)]
    files += [Path(params.tokenizer.name)]
    if isinstance(init := getattr(cfg, "init", None), Path):  # a fine-tune's initial weights (file or folder)
        files.append(init)
    for path in files:
        if path.exists():
            digest.update(_head_digest(path))
    return digest.hexdigest()


def resume(stage: str, trainer: Trainer, params: Params, cfg: TrainConfig) -> None:
    """Continue from the newest valid checkpoint of this very run; one made for other settings or data is moved
    aside to `<checkpoint_dir>.stale` (kept for inspection, never resumed)."""
    trainer.fingerprint = run_fingerprint(params, cfg)
    if cfg.resume != "auto":
        return
    found = trainer.resume_from(cfg.checkpoint_dir)
    if found == "stale":
        stale = cfg.checkpoint_dir.with_name(cfg.checkpoint_dir.name + ".stale")
        if trainer.ctx.is_main:
            shutil.rmtree(stale, ignore_errors=True)
            os.replace(cfg.checkpoint_dir, stale)
            print(f"{stage}: checkpoints in {cfg.checkpoint_dir} were made with other settings or data: moved to "
                  f"{stale}, starting fresh")  # fmt: skip
        if trainer.ctx.distributed:
            torch.distributed.barrier()
    elif found and trainer.ctx.is_main:
        print(f"{stage}: resuming from {found} (step {trainer.step})")


def training_batches(
    stage: str, params: Params, cfg: TrainConfig, splits: list[str], augment: AugmentConfig, trainer: Trainer,
    kind: str = "pairs",
) -> wds.WebLoader:  # fmt: skip
    """The resumable training stream over `splits` (samples of `kind`), continuing from the trainer's position."""
    root = cfg.shard_root or params.data.shard_root
    urls = [url for split in splits for url in shard_urls(root / split)]
    transform = train_transform(params.model.image_size, augment)
    pipeline = train_pipeline(urls, kind, transform, per_rank_batch(stage, cfg, trainer.ctx), seed=cfg.seed,
                              rank=trainer.ctx.rank, shuffle_buffer=params.data.shuffle_buffer,
                              resume=trainer.position)  # fmt: skip
    return make_loader(pipeline, params.data.num_workers)


def save_curves(stage: str, trainer: Trainer, run: StageRun, title: str) -> None:
    for artifact in (write_history_csv(trainer.history, PLOTS / f"{stage}.csv"),
                     plot_history(trainer.history, PLOTS / f"{stage}.png", title)):  # fmt: skip
        run.log_artifact(artifact)


def with_init_model(params: Params, init: Path) -> Params:
    """A transformers folder as a fine-tune's `init` defines the model (its config.json) and the tokenizer (its
    own files) for the whole stage: training, evaluation and the weights it saves. Other weights files are
    described by params.model and params.tokenizer, as before."""
    if not is_transformers_folder(init):
        return params
    folder = read_folder(init, params.model)
    tokenizer = params.tokenizer.model_copy(update={"name": folder.tokenizer or params.tokenizer.name})
    return params.model_copy(update={"model": folder.model, "tokenizer": tokenizer})


def finetune_model(
    task: str, params: Params, cfg: FinetuneConfig, ctx: DistContext, **build: Any
) -> tuple[nn.Module, PreTrainedTokenizer]:
    """The task model built from the config (same initial weights on every rank) with `cfg.init` loaded, then
    each rank seeded apart (dropout, negatives)."""
    torch.use_deterministic_algorithms(cfg.deterministic)
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(params.tokenizer.name)
    model = build_model(task, params.model, tokenizer, **build)
    weights = read_weights(cfg.init, params.model)
    report = load_official(model, weights.state)
    if ctx.is_main:
        print(f"{cfg.name}: {describe(cfg.init, weights, report)}")
    torch.manual_seed(cfg.seed + 1_000 * ctx.rank)
    return model, tokenizer


def finetune_setup(
    task: str, params: Params, cfg: FinetuneConfig, ctx: DistContext, kind: str = "pairs", **build: Any
) -> tuple[Trainer, PreTrainedTokenizer, wds.WebLoader]:
    """What every fine-tune starts with: the initialised model in a cosine-schedule trainer (resumed when a
    checkpoint exists), the tokenizer, and the training stream of `kind` samples."""
    model, tokenizer = finetune_model(task, params, cfg, ctx, **build)
    trainer = Trainer(cfg, model, ctx, partial(cosine_lr, cfg))
    resume(cfg.name, trainer, params, cfg)
    batches = training_batches(cfg.name, params, cfg, cfg.splits, params.data.finetune_augment, trainer, kind)
    return trainer, tokenizer, batches


def fit_and_finish(
    stage: str, params: Params, trainer: Trainer, batches: wds.WebLoader, compute: Compute,
    finish: Callable[[StageRun], None], evaluate: Callable[[], None] | None = None,
) -> None:  # fmt: skip
    """Train inside the stage's MLflow run (the same run again after a resume), then every rank runs `evaluate`
    (evaluations that split work across ranks) and rank 0 runs `finish`."""
    with stage_run(stage, params, run_id=trainer.run_id) as run:
        trainer.run_id = trainer.run_id or run.run_id
        trainer.fit(batches, compute, run, samples_per_step=trainer.cfg.batch_size)
        if evaluate:
            evaluate()
        if trainer.ctx.is_main:
            finish(run)
