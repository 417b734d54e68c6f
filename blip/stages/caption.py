"""`blip caption-finetune`: fine-tune the captioner from the pretrained weights, then evaluate it.

Training: LM loss on "a picture of " + caption, the prompt masked (BLIP's captioning recipe, cosine schedule).
Evaluation on `caption.eval_split`: beam search, COCO-format results JSON, BLEU-1..4 / METEOR / ROUGE-L / CIDEr
(SPICE reported unavailable offline) in metrics/caption.json, and a gallery of generated vs human captions.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from blip.config.tasks import CaptionFinetuneConfig
from blip.data.locations import split_urls
from blip.data.shards import read_records
from blip.eval.caption_metrics import caption_scores, coco_unavailable_reason, spice_unavailable_reason
from blip.eval.captioning import caption_gallery, caption_split
from blip.models.caption import PROMPT
from blip.models.generation import GenerationConfig
from blip.stages.driver import Recipe, Results, stage_main
from blip.training.loop import Trainer


def most_frequent_caption(shard_root: Path, splits: list[str]) -> str:
    counts = Counter(c for split in splits for r in read_records(split_urls(shard_root, split)) for c in r["captions"])
    return counts.most_common(1)[0][0]


class Captioning(Recipe):
    task, title = "caption", "caption fine-tune (LM)"
    cfg: CaptionFinetuneConfig

    def build_args(self) -> dict[str, Any]:
        return {"label_smoothing": self.cfg.label_smoothing}

    def loss(self, model: nn.Module, batch: dict, step: int) -> dict[str, torch.Tensor]:
        tokens = self.tokens([PROMPT + text for text in batch["text"]])
        return {"loss": model(batch["image"].to(self.ctx.device), tokens.input_ids, tokens.attention_mask)}

    def evaluate(self, trainer: Trainer) -> Results:
        cfg, params = self.cfg, self.params
        generation = GenerationConfig("beam", cfg.num_beams, cfg.max_length, cfg.min_length)
        predictions, references, pixels = caption_split(
            trainer.model, split_urls(params.data.shard_root, cfg.eval_split), self.tokenizer, params.model.image_size,
            cfg.eval_images, generation, self.ctx.device,
        )  # fmt: skip
        scores = caption_scores(predictions, references)
        numeric = {k: v for k, v in scores.items() if isinstance(v, float)}
        # The trivial baseline: the most frequent training caption, given for every image.
        baseline = caption_scores(dict.fromkeys(predictions, most_frequent_caption(params.data.shard_root, cfg.splits)),
                                  references)  # fmt: skip
        numeric |= {f"constant_{k}": baseline[k] for k in ("BLEU_4", "CIDEr") if baseline[k] is not None}
        metrics = {**numeric, "images": len(predictions), "loss": trainer.history[-1]["loss"]}
        reports = Path("reports") / self.name
        reports.mkdir(parents=True, exist_ok=True)
        results = reports / "results.json"
        results.write_text(json.dumps([{"image_id": i, "caption": c} for i, c in predictions.items()], indent=1))
        gallery = caption_gallery(predictions, references, pixels, reports / "gallery.png", cfg.gallery_images,
                                  model=f"{self.name} ({cfg.output})", split=cfg.eval_split)  # fmt: skip
        artifacts = [results, gallery]
        missing = [k for k, v in scores.items() if v is None]
        if missing:  # the reason is a report, not a metric
            reason = (coco_unavailable_reason() if "CIDEr" in missing else None) or spice_unavailable_reason()
            print(f"{self.name}: {', '.join(missing)} unavailable: {reason}")
            metrics |= dict.fromkeys(missing)
            artifacts.append(reports / "unavailable.json")
            artifacts[-1].write_text(json.dumps(dict.fromkeys(missing, reason), indent=1))
        return Results(metrics, artifacts)


main = stage_main(Captioning, "caption-finetune", "caption", __doc__ or "")
