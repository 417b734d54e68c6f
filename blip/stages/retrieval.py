"""`blip retrieval-finetune` and `blip retrieval-zeroshot`: image-text retrieval, fine-tuned or straight after
pretraining, evaluated as BLIP reports it.

Fine-tune: ITC with momentum distillation and an image-id queue (captions of one image are positives for each
other) + ITM with hard negatives, cosine schedule. Evaluation (both stages, split across ranks under torchrun):
ITC over all pairs in chunks, ITM re-ranking of the top k, recall@1/5/10 both ways and their means, against
chance (100/N). Writes metrics/<name>.json, reports/<name>/recall_at_k.png, the weights (fine-tune).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizer

from blip.config import Params
from blip.config.tasks import RetrievalEvalConfig, RetrievalFinetuneConfig
from blip.data.items import image_id_numbers
from blip.data.locations import split_urls
from blip.distributed import DistContext, setup, teardown
from blip.eval.retrieval import evaluate_retrieval, load_pair_split, recall_at_k
from blip.eval.world import semantic_recall_at_1
from blip.models.contrastive import DualEncoder, ramped_alpha
from blip.models.factory import load_trained
from blip.stages.common import parse_stage_args, stage_parser
from blip.stages.driver import Recipe, Results, publish_results, stage_main
from blip.tracking import stage_run
from blip.tracking.plots import plot_recall
from blip.training.loop import Trainer


def evaluate(
    model: DualEncoder, params: Params, cfg: RetrievalEvalConfig, tokenizer: PreTrainedTokenizer, ctx: DistContext,
    name: str,
) -> Results:  # fmt: skip
    """Every rank takes part; rank 0's Results hold BLIP's numbers (ITM re-ranked) at the top level, ITC-only
    under `itc_`, and the recall@K plot."""
    split = load_pair_split(split_urls(params.data.shard_root, cfg.split), params.model.image_size, cfg.images)
    rankings = evaluate_retrieval(model, split, tokenizer, params.tokenizer.max_length, cfg.k_test, cfg.itc_chunk,
                                  cfg.itm_batch, ctx.device)  # fmt: skip
    if not ctx.is_main:
        return Results()
    recall = {name: recall_at_k(*pair, split.text_image) for name, pair in rankings.items()}
    chance = 100.0 / len(split.image_ids)  # R@1 of a random ranking, both directions
    about = {"images": float(len(split.image_ids)), "texts": float(len(split.texts)), "chance_r1": chance}
    if all(split.scenes):  # the synthetic world: also count captions true of the image as hits (measuring only)
        about |= semantic_recall_at_1(*rankings["itm"], split.texts, split.scenes)
    plot = plot_recall({"ITC": recall["itc"], "ITC + ITM re-rank": recall["itm"]}, chance,
                       Path("reports") / name / "recall_at_k.png", f"{name} on {cfg.split}")  # fmt: skip
    return Results(dict(recall["itm"]) | {f"itc_{k}": v for k, v in recall["itc"].items()} | about, [plot])


class Retrieval(Recipe):
    task, title = "retrieval", "retrieval fine-tune (ITC + ITM)"
    evaluate_on_all_ranks = True
    cfg: RetrievalFinetuneConfig

    def build_args(self) -> dict[str, Any]:
        return {"queue_size": self.cfg.queue_size, "momentum": self.cfg.momentum,
                "itm_hard_share": self.cfg.itm_hard_negatives}  # fmt: skip

    def loss(self, model: nn.Module, batch: dict, step: int) -> dict[str, torch.Tensor]:
        tokens = self.tokens(batch["text"])
        alpha = ramped_alpha(self.cfg.alpha, step, self.cfg.steps_per_epoch, self.cfg.alpha_ramp_epochs)
        ids = torch.tensor(image_id_numbers(batch["record"]), device=self.ctx.device)
        out = model(batch["image"].to(self.ctx.device), tokens.input_ids, tokens.attention_mask, ids, alpha)
        return {"loss": out.loss, "itc": out.itc, "itm": out.itm}

    def evaluate(self, trainer: Trainer) -> Results:
        return evaluate(trainer.model, self.params, self.cfg.eval, self.tokenizer, self.ctx, self.name)


main = stage_main(Retrieval, "retrieval-finetune", "retrieval", __doc__ or "")


def zeroshot_main(argv: Sequence[str] | None = None) -> int:
    _, params = parse_stage_args(stage_parser("retrieval-zeroshot", __doc__ or ""), argv)
    cfg = params.retrieval_zeroshot
    ctx = setup()
    try:
        model, tokenizer = load_trained("retrieval", cfg.weights, params.model, params.tokenizer.name)
        results = evaluate(model.to(ctx.device), params, cfg.eval, tokenizer, ctx, cfg.name)
        sections = ("retrieval_zeroshot", "data", "tokenizer")  # those its dvc.yaml stage lists under `params:`
        with stage_run(cfg.name, params, sections, f"zero-shot retrieval of {cfg.weights}") as run:
            if ctx.is_main:
                publish_results(cfg.name, results, run)
    finally:
        teardown()
    return 0
