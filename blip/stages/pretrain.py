"""`blip pretrain`: BLIP pretraining (ITC + ITM + LM) on the ingested web + human-annotated shards;
`blip pretrain --section repretrain`: the same on the CapFilt-bootstrapped shards.

Runs in one process (`python -m blip pretrain`) or under `torchrun` (DDP). Resumable checkpoints live in
`<section>.checkpoint_dir`, outside the DVC output, so `dvc repro` never deletes them; the only DVC output is
the final weights file. Writes metrics/<section>.json (the last logged losses, held-out ITC recall) and the
training curves (plots/<section>.csv, .png).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from blip.config.schema import AugmentConfig, PretrainConfig
from blip.data.items import image_id_numbers
from blip.data.locations import split_urls
from blip.eval.itc import itc_recall
from blip.models.contrastive import ramped_alpha
from blip.stages.common import parse_stage_args, stage_parser
from blip.stages.driver import Recipe, Results, train_stage
from blip.training.loop import Trainer
from blip.training.optim import pretrain_lr

PRETRAIN_SECTIONS = ("pretrain", "repretrain")


class Pretraining(Recipe):
    task = "pretrain"
    cfg: PretrainConfig

    @property
    def title(self) -> str:  # type: ignore[override]
        return f"{self.name} (ITC + ITM + LM)"

    def schedule(self) -> str:
        cfg = self.cfg
        return f"linear warm-up over {cfg.warmup_steps} steps, then x{cfg.lr_decay:g} per epoch (floor {cfg.min_lr:g})"

    def build_args(self) -> dict[str, Any]:
        return {"queue_size": self.cfg.queue_size, "momentum": self.cfg.momentum,
                "label_smoothing": self.cfg.label_smoothing, "itm_hard_share": self.cfg.itm_hard_negatives}  # fmt: skip

    def lr_at(self, step: int) -> float:
        return pretrain_lr(self.cfg, step)

    def augment(self) -> AugmentConfig:
        return self.params.data.pretrain_augment

    def loss(self, model: nn.Module, batch: dict, step: int) -> dict[str, torch.Tensor]:
        tokens = self.tokens(batch["text"])
        alpha = ramped_alpha(self.cfg.alpha, step, self.cfg.steps_per_epoch, self.cfg.alpha_ramp_epochs)
        ids = torch.tensor(image_id_numbers(batch["record"]), device=self.ctx.device)
        out = model(batch["image"].to(self.ctx.device), tokens.input_ids, tokens.attention_mask, alpha, ids)
        return {"loss": out.loss, "itc": out.itc, "itm": out.itm, "lm": out.lm, "itc_accuracy": out.itc_accuracy}

    def evaluate(self, trainer: Trainer) -> Results:
        """The last logged training losses, and ITC recall on held-out pairs."""
        metrics = {k: v for k, v in trainer.history[-1].items() if k != "samples_per_s"} if trainer.history else {}
        if self.cfg.eval_split:
            params = self.params
            recall = itc_recall(trainer.model, split_urls(params.data.shard_root, self.cfg.eval_split), self.tokenizer,
                                params.model.image_size, self.cfg.eval_images, params.tokenizer.max_length,
                                self.ctx.device)  # fmt: skip
            metrics |= {f"eval_{k}": v for k, v in recall.items()}
        return Results(metrics)


def main(argv: Sequence[str] | None = None) -> int:
    parser = stage_parser("pretrain", __doc__ or "")
    parser.add_argument("--section", choices=PRETRAIN_SECTIONS, default="pretrain",
                        help="params section to run: pretrain, or repretrain on the CapFilt shards")  # fmt: skip
    args, params = parse_stage_args(parser, argv)
    train_stage(Pretraining, params, args.section, name=args.section)
    return 0
