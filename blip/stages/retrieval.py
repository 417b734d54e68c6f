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

import torch
from transformers import PreTrainedTokenizer

from blip.config import Params
from blip.config.tasks import RetrievalEvalConfig
from blip.eval.retrieval import evaluate_retrieval, load_pair_split, recall_at_k
from blip.eval.world import semantic_recall_at_1
from blip.models.checkpoint import save_weights
from blip.models.contrastive import DualEncoder, ramped_alpha
from blip.models.factory import load_trained
from blip.stages.common import parse_stage_args, stage_parser, write_metrics
from blip.stages.pretrain import image_ids
from blip.stages.training import finetune_setup, fit_and_finish, save_curves, with_init_model
from blip.tracking import stage_run
from blip.tracking.plots import plot_recall
from blip.tracking.runs import StageRun
from blip.training.distributed import DistContext, setup, teardown


def evaluate(
    model: DualEncoder, params: Params, cfg: RetrievalEvalConfig, tokenizer: PreTrainedTokenizer, ctx: DistContext
) -> dict[str, dict[str, float]]:
    split = load_pair_split(params.data.shard_root / cfg.split, params.model.image_size, cfg.images)
    rankings = evaluate_retrieval(model, split, tokenizer, params.tokenizer.max_length, cfg.k_test, cfg.itc_chunk,
                                  cfg.itm_batch, ctx.device)  # fmt: skip
    results = {name: recall_at_k(*pair, split.text_image) for name, pair in rankings.items()}
    chance = 100.0 / len(split.image_ids)  # R@1 of a random ranking, both directions
    results["split"] = {"images": float(len(split.image_ids)), "texts": float(len(split.texts)), "chance_r1": chance}
    if all(split.scenes):  # the synthetic world: also count captions true of the image as hits (measuring only)
        results["split"] |= semantic_recall_at_1(*rankings["itm"], split.texts, split.scenes)
    return results


def report(name: str, results: dict[str, dict[str, float]], run: StageRun, step: int | None) -> dict[str, float]:
    """metrics/<name>.json: BLIP's numbers (ITM re-ranked) at the top level, ITC-only under `itc_`."""
    metrics = dict(results["itm"]) | {f"itc_{k}": v for k, v in results["itc"].items()} | results["split"]
    run.log_metrics(metrics, step=step)
    plot = plot_recall({"ITC": results["itc"], "ITC + ITM re-rank": results["itm"]}, results["split"]["chance_r1"],
                       Path("reports") / name / "recall_at_k.png", name)  # fmt: skip
    for artifact in (write_metrics(name, metrics), plot):
        run.log_artifact(artifact)
    print(f"{name}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    return metrics


def main(argv: Sequence[str] | None = None) -> int:
    _, params = parse_stage_args(stage_parser("retrieval-finetune", __doc__ or ""), argv)
    params = with_init_model(params, params.retrieval.init)
    cfg = params.retrieval
    ctx = setup()
    try:
        trainer, tokenizer, batches = finetune_setup(
            "retrieval", params, cfg, ctx, queue_size=cfg.queue_size, momentum=cfg.momentum
        )
        max_length = params.tokenizer.max_length

        def compute(forward: torch.nn.Module, batch: dict, step: int) -> dict[str, torch.Tensor]:
            tokens = tokenizer(batch["text"], padding="longest", truncation=True, max_length=max_length,
                               return_tensors="pt").to(ctx.device)  # fmt: skip
            alpha = ramped_alpha(cfg.alpha, step, cfg.steps_per_epoch, cfg.alpha_ramp_epochs)
            out = forward(batch["image"].to(ctx.device), tokens.input_ids, tokens.attention_mask,
                          image_ids(batch["record"], ctx.device), alpha)  # fmt: skip
            return {"loss": out.loss, "itc": out.itc, "itm": out.itm}

        results: dict[str, dict[str, float]] = {}

        def finish(run: StageRun) -> None:
            report(cfg.name, results, run, trainer.step)
            save_curves(cfg.name, trainer, run, "retrieval fine-tune (ITC + ITM)")
            run.log_artifact(save_weights(trainer.model, cfg.output, params.tokenizer.name))

        def evaluate_all_ranks() -> None:
            results.update(evaluate(trainer.model, params, cfg.eval, tokenizer, ctx))

        fit_and_finish(cfg.name, params, trainer, batches, compute, finish, evaluate_all_ranks)
    finally:
        teardown()
    return 0


def zeroshot_main(argv: Sequence[str] | None = None) -> int:
    _, params = parse_stage_args(stage_parser("retrieval-zeroshot", __doc__ or ""), argv)
    cfg = params.retrieval_zeroshot
    ctx = setup()
    try:
        model, tokenizer = load_trained("retrieval", cfg.weights, params.model, params.tokenizer.name)
        results = evaluate(model.to(ctx.device), params, cfg.eval, tokenizer, ctx)
        with stage_run(cfg.name, params) as run:
            if ctx.is_main:
                report(cfg.name, results, run, None)
    finally:
        teardown()
    return 0
