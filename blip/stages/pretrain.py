"""`blip pretrain`: BLIP pretraining (ITC + ITM + LM) on the ingested web + human-annotated shards;
`blip pretrain --section repretrain`: the same on the CapFilt-bootstrapped shards.

Runs in one process (`python -m blip pretrain`) or under `torchrun` (DDP). Resumable checkpoints live in
`<section>.checkpoint_dir`, outside the DVC output, so `dvc repro` never deletes them; the only DVC output is
the final weights file. Writes metrics/<section>.json and the training curves (plots/<section>.csv, .png).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from functools import partial

import torch
import yaml
from transformers import PreTrainedTokenizer

from blip.config import Params
from blip.config.schema import PretrainConfig
from blip.data.tokenizer import load_tokenizer
from blip.eval.itc import itc_recall
from blip.models.checkpoint import save_weights
from blip.models.contrastive import ramped_alpha
from blip.models.factory import build_model
from blip.stages.common import parse_stage_args, stage_parser, write_metrics
from blip.stages.training import fit_and_finish, resume, save_curves, training_batches
from blip.tracking.runs import StageRun
from blip.training.distributed import setup, teardown
from blip.training.loop import Trainer
from blip.training.optim import pretrain_lr

PRETRAIN_SECTIONS = ("pretrain", "repretrain")


def image_ids(records: list[dict], device: torch.device) -> torch.Tensor:
    """Stable integer ids from the records' image ids (captions of one image share one)."""
    return torch.tensor([zlib.crc32(r["image_id"].encode()) & 0x7FFFFFFF for r in records], device=device)


def main(argv: Sequence[str] | None = None) -> int:
    parser = stage_parser("pretrain", __doc__ or "")
    parser.add_argument("--section", choices=PRETRAIN_SECTIONS, default="pretrain",
                        help="params section to run: pretrain, or repretrain on the CapFilt shards")  # fmt: skip
    args, params = parse_stage_args(parser, argv)
    name, data = args.section, params.data  # metrics/<name>.json, plots/<name>.csv, the MLflow run
    cfg = getattr(params, name)
    ctx = setup()
    try:
        torch.use_deterministic_algorithms(cfg.deterministic)
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        tokenizer = load_tokenizer(params.tokenizer.name)
        model = build_model("pretrain", params.model, tokenizer, cfg.queue_size, cfg.momentum, cfg.label_smoothing)
        torch.manual_seed(cfg.seed + 1_000 * ctx.rank)  # then each rank its own dropout / negatives
        trainer = Trainer(cfg, model, ctx, partial(pretrain_lr, cfg))
        resume(name, trainer, params, cfg)
        batches = training_batches(name, params, cfg, cfg.splits, data.pretrain_augment, trainer)
        max_length = params.tokenizer.max_length

        def compute(forward: torch.nn.Module, batch: dict, step: int) -> dict[str, torch.Tensor]:
            tokens = tokenizer(batch["text"], padding="longest", truncation=True, max_length=max_length,
                               return_tensors="pt").to(ctx.device)  # fmt: skip
            alpha = ramped_alpha(cfg.alpha, step, cfg.steps_per_epoch, cfg.alpha_ramp_epochs)
            out = forward(batch["image"].to(ctx.device), tokens.input_ids, tokens.attention_mask, alpha,
                          image_ids(batch["record"], ctx.device))  # fmt: skip
            return {"loss": out.loss, "itc": out.itc, "itm": out.itm, "lm": out.lm, "itc_accuracy": out.itc_accuracy}

        fit_and_finish(
            name, params, trainer, batches, compute, lambda run: finish(params, name, trainer, tokenizer, run)
        )
    finally:
        teardown()
    return 0


def finish(params: Params, name: str, trainer: Trainer, tokenizer: PreTrainedTokenizer, run: StageRun) -> None:
    """Rank 0, after training: held-out ITC recall, final weights, metrics, curves, MLflow artifacts."""
    cfg: PretrainConfig = getattr(params, name)
    model = trainer.model
    metrics = {k: v for k, v in trainer.history[-1].items() if k != "samples_per_s"} if trainer.history else {}
    if cfg.eval_split:
        recall = itc_recall(model, params.data.shard_root / cfg.eval_split, tokenizer, params.model.image_size,
                            cfg.eval_images, params.tokenizer.max_length, trainer.ctx.device)  # fmt: skip
        metrics |= {f"eval_{k}": v for k, v in recall.items()}
        run.log_metrics({f"eval_{k}": v for k, v in recall.items()}, step=trainer.step)
    weights = save_weights(model, cfg.output, params.tokenizer.name)
    path = write_metrics(name, metrics)
    save_curves(name, trainer, run, f"{name} (ITC + ITM + LM)")
    run.log_text(yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False), "config.yaml")
    for artifact in (path, weights):
        run.log_artifact(artifact)
    summary = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items())
    print(f"{name}: {trainer.step} steps, weights {weights}, {summary}")
