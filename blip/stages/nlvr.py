"""`blip nlvr-finetune`: NLVR2 (is the statement true of the image pair?) fine-tuned from the pretrained weights.

Both cross-attentions of every layer start from the pretrained one (`BlipNLVR.adapt_official`); the merge layers
and the classifier start fresh. Cross-entropy, cosine schedule. Evaluation: accuracy on `nlvr.eval_split`
against 50% and the majority training label.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import PreTrainedTokenizer

from blip.config import Params
from blip.data.loader import eval_pipeline, make_loader
from blip.data.shards import read_records, shard_urls
from blip.data.transforms import eval_transform
from blip.models.checkpoint import save_weights
from blip.models.nlvr import BlipNLVR
from blip.stages.common import parse_stage_args, stage_parser, write_metrics
from blip.stages.training import finetune_setup, fit_and_finish, save_curves, with_init_model
from blip.tracking.runs import StageRun
from blip.training.distributed import setup, teardown
from blip.training.loop import Trainer


def labels(records: list[dict], device: torch.device) -> torch.Tensor:
    return torch.tensor([int(bool(r["label"])) for r in records], device=device)


def accuracy(predictions: dict[str, bool], truth: dict[str, bool]) -> float:
    """Percent of pairs predicted right; every pair of `truth` must have a prediction."""
    missing = truth.keys() - predictions.keys()
    if missing:
        raise ValueError(f"{len(missing)} pairs have no prediction, e.g. {sorted(missing)[:3]}")
    return 100.0 * sum(predictions[k] == v for k, v in truth.items()) / len(truth)


@torch.no_grad()
def predict(model: BlipNLVR, params: Params, tokenizer: PreTrainedTokenizer, device: torch.device,
            ) -> tuple[dict[str, bool], dict[str, bool]]:  # fmt: skip
    """(prediction, label) per pair id of the evaluation split."""
    was_training = model.training
    model.eval()
    predictions, truth = {}, {}
    shards = shard_urls(params.data.shard_root / params.nlvr.eval_split)
    for batch in make_loader(eval_pipeline(shards, "nlvr", eval_transform(params.model.image_size), 64), 0):
        if "image" not in batch:
            continue
        tokens = tokenizer(batch["text"], padding="longest", truncation=True, max_length=params.tokenizer.max_length,
                           return_tensors="pt").to(device)  # fmt: skip
        logits = model.logits(batch["image"].to(device), batch["image2"].to(device), tokens.input_ids,
                              tokens.attention_mask)  # fmt: skip
        for record, label in zip(batch["record"], logits.argmax(1).tolist(), strict=True):
            predictions[record["pair_id"]] = bool(label)
            truth[record["pair_id"]] = bool(record["label"])
    model.train(was_training)
    return predictions, truth


def main(argv: Sequence[str] | None = None) -> int:
    _, params = parse_stage_args(stage_parser("nlvr-finetune", __doc__ or ""), argv)
    params = with_init_model(params, params.nlvr.init)
    cfg = params.nlvr
    ctx = setup()
    try:
        trainer, tokenizer, batches = finetune_setup("nlvr", params, cfg, ctx, "nlvr")
        max_length = params.tokenizer.max_length

        def compute(forward: torch.nn.Module, batch: dict, step: int) -> dict[str, torch.Tensor]:
            tokens = tokenizer(batch["text"], padding="longest", truncation=True, max_length=max_length,
                               return_tensors="pt").to(ctx.device)  # fmt: skip
            loss = forward(batch["image"].to(ctx.device), batch["image2"].to(ctx.device), tokens.input_ids,
                           tokens.attention_mask, labels(batch["record"], ctx.device))  # fmt: skip
            return {"loss": loss}

        fit_and_finish(cfg.name, params, trainer, batches, compute, lambda run: finish(params, trainer, tokenizer, run))
    finally:
        teardown()
    return 0


def finish(params: Params, trainer: Trainer, tokenizer: PreTrainedTokenizer, run: StageRun) -> None:
    cfg = params.nlvr
    predictions, truth = predict(trainer.model, params, tokenizer, trainer.ctx.device)
    train_labels = Counter(
        bool(r["label"]) for split in cfg.splits for r in read_records(params.data.shard_root / split)
    )
    majority = train_labels.most_common(1)[0][0]
    metrics = {
        "accuracy": accuracy(predictions, truth),
        "majority_label_accuracy": accuracy(dict.fromkeys(truth, majority), truth),
        "pairs": float(len(truth)),
    }
    run.log_metrics(metrics, step=trainer.step)
    reports = Path("reports") / cfg.name
    reports.mkdir(parents=True, exist_ok=True)
    results = reports / "results.json"
    results.write_text(json.dumps([{"pair_id": k, "label": v} for k, v in predictions.items()], indent=1))
    save_curves(cfg.name, trainer, run, "NLVR2 fine-tune")
    for artifact in (write_metrics(cfg.name, metrics), results, save_weights(trainer.model, cfg.output,
                                                                              params.tokenizer.name)):  # fmt: skip
        run.log_artifact(artifact)
    print(f"{cfg.name}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
