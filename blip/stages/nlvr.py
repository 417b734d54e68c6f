"""`blip nlvr-finetune`: NLVR2 (is the statement true of the image pair?) fine-tuned from the pretrained weights.

Both cross-attentions of every layer start from the pretrained one (`BlipNLVR.adapt_official`); the merge layers
and the classifier start fresh. Cross-entropy, cosine schedule. Evaluation: accuracy on `nlvr.eval_split`
against 50% and the majority training label.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from blip.config.tasks import NlvrFinetuneConfig
from blip.data.loader import eval_pipeline, make_loader
from blip.data.locations import split_urls
from blip.data.shards import read_records
from blip.data.transforms import eval_transform
from blip.models.nlvr import BlipNLVR
from blip.stages.driver import Recipe, Results, stage_main
from blip.training.loop import Trainer


def accuracy(predictions: dict[str, bool], truth: dict[str, bool]) -> float:
    """Percent of pairs predicted right; every pair of `truth` must have a prediction."""
    missing = truth.keys() - predictions.keys()
    if missing:
        raise ValueError(f"{len(missing)} pairs have no prediction, e.g. {sorted(missing)[:3]}")
    return 100.0 * sum(predictions[k] == v for k, v in truth.items()) / len(truth)


class Nlvr(Recipe):
    task, kind, title = "nlvr", "nlvr", "NLVR2 fine-tune"
    cfg: NlvrFinetuneConfig

    def loss(self, model: nn.Module, batch: dict, step: int) -> dict[str, torch.Tensor]:
        device = self.ctx.device
        tokens = self.tokens(batch["text"])
        labels = torch.tensor([int(bool(r["label"])) for r in batch["record"]], device=device)
        loss = model(batch["image"].to(device), batch["image2"].to(device), tokens.input_ids, tokens.attention_mask,
                     labels)  # fmt: skip
        return {"loss": loss}

    @torch.no_grad()
    def predict(self, model: BlipNLVR) -> tuple[dict[str, bool], dict[str, bool]]:
        """(prediction, label) per pair id of the evaluation split."""
        was_training = model.training
        model.eval()
        predictions, truth = {}, {}
        shards = split_urls(self.params.data.shard_root, self.cfg.eval_split)
        for batch in make_loader(eval_pipeline(shards, "nlvr", eval_transform(self.params.model.image_size), 64), 0):
            if "image" not in batch:
                continue
            tokens = self.tokens(batch["text"])
            logits = model.logits(batch["image"].to(self.ctx.device), batch["image2"].to(self.ctx.device),
                                  tokens.input_ids, tokens.attention_mask)  # fmt: skip
            for record, label in zip(batch["record"], logits.argmax(1).tolist(), strict=True):
                predictions[record["pair_id"]] = bool(label)
                truth[record["pair_id"]] = bool(record["label"])
        model.train(was_training)
        return predictions, truth

    def evaluate(self, trainer: Trainer) -> Results:
        predictions, truth = self.predict(trainer.model)
        root = self.params.data.shard_root
        labels = [bool(r["label"]) for s in self.cfg.splits for r in read_records(split_urls(root, s))]
        majority = Counter(labels).most_common(1)
        metrics = {"accuracy": accuracy(predictions, truth),
                   "majority_label_accuracy": accuracy(dict.fromkeys(truth, majority[0][0]), truth),
                   "pairs": float(len(truth))}  # fmt: skip
        reports = Path("reports") / self.name
        reports.mkdir(parents=True, exist_ok=True)
        results = reports / "results.json"
        results.write_text(json.dumps([{"pair_id": k, "label": v} for k, v in predictions.items()], indent=1))
        return Results(metrics, [results])


main = stage_main(Nlvr, "nlvr-finetune", "nlvr", __doc__ or "")
