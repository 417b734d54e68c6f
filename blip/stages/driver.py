"""The one driver of every training stage; a stage file holds only its task, as a `Recipe`.

A recipe says what is specific to a task: the model it builds, the samples it trains on, the loss of a batch, and
its evaluation (metrics and the artifacts people look at). The driver does the rest the same way for pretraining,
re-pretraining and the four fine-tunes: arguments and params, process group, seeding, the initial weights (a
transformers folder as `init` also decides the model and tokenizer), the resumable training stream, resume of this
very run, the fit inside the stage's MLflow run, evaluation, and publishing (`metrics/<name>.json`, the training
curves, the weights, MLflow metrics and artifacts) on rank 0.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import webdataset as wds
from torch import nn
from transformers import PreTrainedTokenizer

from blip.config import ConfigError, Params
from blip.config.schema import AugmentConfig, TrainConfig
from blip.data import locations
from blip.data.loader import make_loader, train_pipeline
from blip.data.tokenizer import load_tokenizer
from blip.data.transforms import train_transform
from blip.distributed import DistContext, setup, teardown
from blip.models.checkpoint import save_weights
from blip.models.factory import build_model, describe, load_official, read_weights
from blip.models.import_hf import is_transformers_folder, read_folder
from blip.stages.common import parse_stage_args, stage_parser, write_metrics
from blip.tracking import stage_run
from blip.tracking.plots import plot_history, write_history_csv
from blip.tracking.runs import StageRun
from blip.training.loop import Trainer
from blip.training.optim import cosine_lr

PLOTS = Path("plots")


@dataclass
class Results:
    """What an evaluation gives: metrics (numbers, and strings such as SPICE's reason) and files to keep."""

    metrics: dict[str, Any] = field(default_factory=dict)
    artifacts: list[Path] = field(default_factory=list)


class Recipe:
    """A task. Subclasses set the class attributes and implement `loss` and `evaluate`."""

    task: ClassVar[str]  # the model registry's name (blip.models.factory.TASKS)
    kind: ClassVar[str] = "pairs"  # the samples of the training stream
    title: ClassVar[str]  # the training curves' title
    evaluate_on_all_ranks: ClassVar[bool] = False  # True: evaluation splits its work across ranks

    def __init__(self, params: Params, cfg: TrainConfig, ctx: DistContext, tokenizer: PreTrainedTokenizer,
                 name: str) -> None:  # fmt: skip
        """`name`: of everything the stage writes (metrics/<name>.json, plots/<name>.*, the MLflow run)."""
        self.params, self.cfg, self.ctx, self.tokenizer, self.name = params, cfg, ctx, tokenizer, name

    def build_args(self) -> dict[str, Any]:
        """Keyword arguments of `build_model` beyond the config and tokenizer."""
        return {}

    def lr_at(self, step: int) -> float:
        """BLIP's fine-tuning schedule: cosine per epoch to `min_lr`, no warm-up."""
        return cosine_lr(self.cfg, step)

    def schedule(self) -> str:
        """`lr_at` in words, for the training curves' learning-rate panel."""
        cfg = self.cfg
        return f"cosine to {cfg.min_lr:g} over {cfg.epochs} epochs, set once per epoch"

    def augment(self) -> AugmentConfig:
        return self.params.data.finetune_augment

    def tokens(self, texts: list[str]) -> Any:
        return self.tokenizer(texts, padding="longest", truncation=True, max_length=self.params.tokenizer.max_length,
                              return_tensors="pt").to(self.ctx.device)  # fmt: skip

    def loss(self, model: nn.Module, batch: dict, step: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def evaluate(self, trainer: Trainer) -> Results:
        raise NotImplementedError


def run_fingerprint(params: Params, cfg: TrainConfig) -> str:
    """What a training run's checkpoints depend on: its settings, model, tokenizer, training shards and initial
    weights. DVC reruns a stage when any of these changed; resuming the old run's checkpoint would then silently
    mix two runs (or skip training altogether)."""
    operational = {"name", "log_every", "checkpoint_every", "keep_checkpoints", "checkpoint_dir", "resume", "output"}
    digest = hashlib.sha256(cfg.model_dump_json(exclude=operational).encode())
    for section in (params.model, params.data, params.tokenizer):
        digest.update(section.model_dump_json().encode())
    root = cfg.shard_root or params.data.shard_root
    urls = [url for split in cfg.splits for url in locations.split_urls(root, split)]
    digest.update(locations.remote_versions(urls))
    files = [Path(url) for url in urls if locations.is_local(url)] + [Path(params.tokenizer.name)]
    if isinstance(init := getattr(cfg, "init", None), Path):  # a fine-tune's initial weights (file or folder)
        files.append(init)
    for path in files:
        if path.exists():
            digest.update(_head_digest(path))
    return digest.hexdigest()


def _head_digest(path: Path) -> bytes:
    if path.is_dir():  # a transformers folder: each of its files
        return b"".join(_head_digest(p) for p in sorted(path.rglob("*")) if p.is_file())
    with path.open("rb") as f:  # name, size and the first MiB: cheap even for a web-scale shard list
        return hashlib.sha256(f"{path.name}:{path.stat().st_size}".encode() + f.read(1 << 20)).digest()


def with_init_model(params: Params, init: Path) -> Params:
    """A transformers folder as a fine-tune's `init` defines the model (its config.json) and the tokenizer (its
    own files) for the whole stage: training, evaluation and the weights it saves. Other weights files are
    described by params.model and params.tokenizer."""
    if not is_transformers_folder(init):
        return params
    folder = read_folder(init, params.model)
    tokenizer = params.tokenizer.model_copy(update={"name": folder.tokenizer or params.tokenizer.name})
    return params.model_copy(update={"model": folder.model, "tokenizer": tokenizer})


def per_rank_batch(stage: str, cfg: TrainConfig, ctx: DistContext) -> int:
    per_rank, remainder = divmod(cfg.batch_size, ctx.world_size * cfg.accumulation)
    if remainder or per_rank == 0:
        raise ConfigError(f"{stage}.batch_size {cfg.batch_size} does not split over {ctx.world_size} ranks x "
                          f"{cfg.accumulation} accumulation steps")  # fmt: skip
    return per_rank


def training_batches(recipe: Recipe, trainer: Trainer) -> wds.WebLoader:
    """The resumable training stream of the recipe's samples, continuing from the trainer's position."""
    params, cfg = recipe.params, recipe.cfg
    root = cfg.shard_root or params.data.shard_root
    urls = [url for split in cfg.splits for url in locations.split_urls(root, split)]
    transform = train_transform(params.model.image_size, recipe.augment())
    pipeline = train_pipeline(urls, recipe.kind, transform, per_rank_batch(recipe.name, cfg, trainer.ctx),
                              seed=cfg.seed, rank=trainer.ctx.rank, shuffle_buffer=params.data.shuffle_buffer,
                              resume=trainer.position)  # fmt: skip
    return make_loader(pipeline, params.data.num_workers)


def train_stage(recipe_class: type[Recipe], params: Params, section: str, name: str | None = None) -> None:
    """Train and evaluate `recipe_class`'s task with the params `section`; `name` defaults to its output's stem."""
    cfg: TrainConfig = getattr(params, section)
    ctx = setup()
    try:
        torch.use_deterministic_algorithms(cfg.deterministic)
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        tokenizer = load_tokenizer(params.tokenizer.name)
        recipe = recipe_class(params, cfg, ctx, tokenizer, name or cfg.name)
        model = build_model(recipe.task, params.model, tokenizer, **recipe.build_args())
        init: Path | None = getattr(cfg, "init", None)
        if init is not None:
            weights = read_weights(init, params.model)
            report = load_official(model, weights.state)
            if ctx.is_main:
                print(f"{recipe.name}: {describe(init, weights, report)}")
        torch.manual_seed(cfg.seed + 1_000 * ctx.rank)  # then each rank its own dropout / negatives
        trainer = Trainer(cfg, model, ctx, recipe.lr_at, fingerprint=run_fingerprint(params, cfg))
        trainer.resume()
        batches = training_batches(recipe, trainer)
        start = f"from {init}" if init is not None else "from scratch"
        description = f"{recipe.title} {start}: {cfg.total_steps} steps of {cfg.batch_size} -> {cfg.output}"
        sections = (section, "model", "tokenizer", "data")  # those its dvc.yaml stage lists under `params:`
        with stage_run(recipe.name, params, sections, description, run_id=trainer.run_id) as run:
            trainer.fit(batches, recipe.loss, run, samples_per_step=cfg.batch_size)
            results = recipe.evaluate(trainer) if recipe.evaluate_on_all_ranks or ctx.is_main else Results()
            if ctx.is_main:
                publish(recipe, trainer, results, run)
    finally:
        teardown()


def publish(recipe: Recipe, trainer: Trainer, results: Results, run: StageRun) -> None:
    """Rank 0: the weights, the curves, the config, then the results."""
    cfg, params, name = recipe.cfg, recipe.params, recipe.name
    weights = save_weights(trainer.model, cfg.output, params.tokenizer.name)
    run.log_artifact(write_history_csv(trainer.history, PLOTS / f"{name}.csv"), "training_curves.csv")
    curves = plot_history(trainer.history, PLOTS / f"{name}.png", recipe.title, recipe.schedule())
    run.log_artifact(curves, "training_curves.png")
    run.log_artifact(weights, "weights.safetensors")
    print(f"{name}: {trainer.step} steps, weights {weights}")
    logged = set(trainer.history[-1]) if trainer.history else set()  # the training curves hold these already
    publish_results(name, results, run, logged)


def publish_results(name: str, results: Results, run: StageRun, logged: set[str] = frozenset()) -> Path:
    """metrics/<name>.json, the numbers as MLflow summary metrics (but those `logged` as training curves already),
    the files as artifacts; a one-line summary."""
    numbers = {k: v for k, v in results.metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    run.log_metrics({k: v for k, v in numbers.items() if k not in logged})
    path = write_metrics(name, results.metrics)
    run.log_artifact(path, "metrics.json")
    for artifact in results.artifacts:
        run.log_artifact(artifact)
    print(f"{name}: " + ", ".join(f"{k}={v:.4g}" for k, v in numbers.items()))
    return path


StageMain = Callable[[Sequence[str] | None], int]


def stage_main(recipe_class: type[Recipe], command: str, section: str, doc: str) -> StageMain:
    """A stage's `main(argv)`: params (with a transformers `init` folder's model), then `train_stage`."""

    def main(argv: Sequence[str] | None = None) -> int:
        _, params = parse_stage_args(stage_parser(command, doc), argv)
        cfg = getattr(params, section)
        if isinstance(getattr(cfg, "init", None), Path):
            params = with_init_model(params, cfg.init)
        train_stage(recipe_class, params, section)
        return 0

    return main
