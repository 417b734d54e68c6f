"""`blip caption-finetune`: fine-tune the captioner from the pretrained weights, then evaluate it.

Training: LM loss on "a picture of " + caption, the prompt masked (BLIP's captioning recipe, cosine schedule).
Evaluation on `caption.eval_split`: beam search, COCO-format results JSON, BLEU-1..4 / METEOR / ROUGE-L / CIDEr
(SPICE reported unavailable offline) in metrics/caption.json, and a gallery of generated vs human captions.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import PreTrainedTokenizer

from blip.config import Params
from blip.data.shards import read_records
from blip.eval.caption_metrics import caption_scores
from blip.eval.captioning import caption_gallery, caption_split
from blip.models.caption import PROMPT
from blip.models.checkpoint import save_weights
from blip.models.generation import GenerationConfig
from blip.stages.common import parse_stage_args, stage_parser, write_metrics
from blip.stages.training import finetune_setup, fit_and_finish, save_curves, with_init_model
from blip.tracking.runs import StageRun
from blip.training.distributed import setup, teardown
from blip.training.loop import Trainer


def main(argv: Sequence[str] | None = None) -> int:
    _, params = parse_stage_args(stage_parser("caption-finetune", __doc__ or ""), argv)
    params = with_init_model(params, params.caption.init)
    cfg = params.caption
    ctx = setup()
    try:
        # keeps the image encoder and the decoder of the pretrained weights
        trainer, tokenizer, batches = finetune_setup("caption", params, cfg, ctx, label_smoothing=cfg.label_smoothing)
        max_length = params.tokenizer.max_length

        def compute(forward: torch.nn.Module, batch: dict, step: int) -> dict[str, torch.Tensor]:
            tokens = tokenizer([PROMPT + text for text in batch["text"]], padding="longest", truncation=True,
                               max_length=max_length, return_tensors="pt").to(ctx.device)  # fmt: skip
            return {"loss": forward(batch["image"].to(ctx.device), tokens.input_ids, tokens.attention_mask)}

        fit_and_finish(cfg.name, params, trainer, batches, compute, lambda run: finish(params, trainer, tokenizer, run))
    finally:
        teardown()
    return 0


def most_frequent_caption(shard_root: Path, splits: list[str]) -> str:
    counts = Counter(c for split in splits for r in read_records(shard_root / split) for c in r["captions"])
    return counts.most_common(1)[0][0]


def finish(params: Params, trainer: Trainer, tokenizer: PreTrainedTokenizer, run: StageRun) -> None:
    cfg = params.caption
    generation = GenerationConfig("beam", cfg.num_beams, cfg.max_length, cfg.min_length)
    predictions, references, pixels = caption_split(
        trainer.model, params.data.shard_root / cfg.eval_split, tokenizer, params.model.image_size,
        cfg.eval_images, generation, trainer.ctx.device,
    )  # fmt: skip
    scores = caption_scores(predictions, references)
    numeric = {k: v for k, v in scores.items() if isinstance(v, float)}
    # The trivial baseline: the most frequent training caption, given for every image.
    constant = most_frequent_caption(params.data.shard_root, cfg.splits)
    baseline = caption_scores(dict.fromkeys(predictions, constant), references)
    numeric |= {f"constant_{k}": baseline[k] for k in ("BLEU_4", "CIDEr")}
    metrics = {**numeric, "images": len(predictions), "loss": trainer.history[-1]["loss"]}
    metrics |= {k: v for k, v in scores.items() if isinstance(v, str)}  # SPICE's reason, never a number
    run.log_metrics(numeric, step=trainer.step)
    reports = Path("reports") / cfg.name
    reports.mkdir(parents=True, exist_ok=True)
    results = reports / "results.json"
    results.write_text(json.dumps([{"image_id": i, "caption": c} for i, c in predictions.items()], indent=1))
    gallery = caption_gallery(predictions, references, pixels, reports / "gallery.png", cfg.gallery_images)
    weights = save_weights(trainer.model, cfg.output, params.tokenizer.name)
    save_curves(cfg.name, trainer, run, "caption fine-tune (LM)")
    for artifact in (write_metrics(cfg.name, metrics), results, gallery, weights):
        run.log_artifact(artifact)
    print(f"{cfg.name}: " + ", ".join(f"{k}={v:.4g}" for k, v in numeric.items()))
