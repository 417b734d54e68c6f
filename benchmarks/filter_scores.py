"""Which score tells the captioner's true captions from its false ones (issue 17)? The captioner writes `--per-image`
nucleus captions for each of `--images` web images at each `--top-p`; each caption is scored by the filter's ITM
probability and ITC similarity (what `blip capfilt` can filter on) and by the captioner's own log-likelihood of it
(summed, and per token). For each score: the ROC-AUC of true against false captions (overall, and within captions of
one object and of two, which the summed log-likelihood's preference for short captions cannot explain), how often it
ranks a true caption of an image above a false one of the same image, the truth of the caption it picks per image,
and the share kept and kept true at the calibrated threshold (`capfilt.calibration_keep` of held-out human pairs).
Which captions are true comes from the built-in world's scenes: read here to measure, never by a stage.

    python -m benchmarks.filter_scores [--top-p 0.5 0.9] [--images 600] [--per-image 5]   # writes benchmarks/results/
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from blip.capfilt.bootstrap import Bootstrapper, Models, load_models
from blip.config.params import load_params
from blip.data.language import is_true, parse
from blip.data.locations import split_urls
from blip.data.scene import Scene
from blip.eval.filter_quality import roc_auc
from blip.eval.retrieval import load_pair_split
from blip.models.caption import PROMPT

KINDS = {"one object": "Exists", "two objects": "Pair"}


@torch.inference_mode()
def scores(boot: Bootstrapper, models: Models, images: torch.Tensor, texts: list[str]) -> dict[str, torch.Tensor]:
    """ITM, ITC and the captioner's summed and per-token log-likelihood of each (image, text) row, in batches."""
    out: dict[str, list[torch.Tensor]] = {"itm": [], "itc": [], "loglik_sum": [], "loglik_mean": []}
    captioner, tokenizer = models.captioner, models.captioner_tokenizer
    for start in range(0, len(texts), 256):
        batch_images, batch_texts = images[start : start + 256], texts[start : start + 256]
        for name, values in boot.score(batch_images, batch_texts).items():
            out[name].append(values)
        tokens = tokenizer([PROMPT + text for text in batch_texts], padding="longest", truncation=True,
                           max_length=boot.max_length, return_tensors="pt")  # fmt: skip
        loglik = -captioner.negative_log_likelihood(batch_images, tokens.input_ids, tokens.attention_mask).float()
        out["loglik_sum"].append(loglik)
        out["loglik_mean"].append(loglik / tokens.attention_mask[:, captioner.prompt_length :].sum(1))  # [SEP] too
    return {name: torch.cat(values) for name, values in out.items()}


def within_image(values: torch.Tensor, truth: torch.Tensor) -> float:
    """Over images with true and false captions: how often a true caption outscores a false one of the same image."""
    both = [(v, t) for v, t in zip(values, truth, strict=True) if 0 < t.sum() < len(t)]
    pairs = [(v[t][:, None] > v[~t][None, :]).float().mean() for v, t in both]
    return torch.stack(pairs).mean().item() if pairs else float("nan")


def report(values: torch.Tensor, truth: torch.Tensor, kinds: list[str], threshold: float, per_image: int) -> dict:
    kept = values >= threshold
    row = {"auc": roc_auc(values, truth)}
    for label, kind in KINDS.items():
        rows = torch.tensor([k == kind for k in kinds])
        row[f"auc {label}"] = roc_auc(values[rows], truth[rows])
    grid, truth_grid = values.view(-1, per_image), truth.view(-1, per_image)
    if per_image > 1:
        row["same image"] = within_image(grid, truth_grid)
        row["picked true"] = truth_grid[torch.arange(len(grid)), grid.argmax(1)].float().mean().item()
    row |= {"kept": kept.float().mean().item(), "kept true": truth[kept].float().mean().item()}
    return row


def print_table(title: str, result: dict) -> None:
    rows = {name: row for name, row in result.items() if isinstance(row, dict)}
    columns = list(next(iter(rows.values())))
    print(f"\n{title}: {result['captions']} captions, {result['true']:.1%} true")
    print(f"{'score':12s}" + "".join(f"{c:>16s}" for c in columns))
    for name, row in rows.items():
        print(f"{name:12s}" + "".join(f"{row[c]:16.3f}" for c in columns), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--top-p", type=float, nargs="+", default=[0.5, 0.9])
    parser.add_argument("--images", type=int, default=600, help="web images captioned")
    parser.add_argument("--per-image", type=int, default=5, help="captions sampled per image")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/filter_scores.json"))
    args = parser.parse_args()
    params = load_params(args.params)
    params = params.model_copy(update={"capfilt": params.capfilt.model_copy(update={"threshold_rule": "fixed"})})
    models = load_models(params, torch.device("cpu"))
    boot = Bootstrapper(params, models, torch.device("cpu"))
    if len(set(models.image_sizes)) > 1:
        raise SystemExit("filter_scores: the captioner and the filter must read the same image size")
    size, shards = models.image_sizes[0], params.data.shard_root
    web = load_pair_split(split_urls(shards, "web"), size, args.images)
    human = load_pair_split(split_urls(shards, params.capfilt.calibration_split), size, 10**9)
    calibration = scores(boot, models, human.images[human.text_image], human.texts)
    keep_share = params.capfilt.calibration_keep
    thresholds = {name: torch.quantile(v.double(), 1 - keep_share).item() for name, v in calibration.items()}
    images = web.images.repeat_interleave(args.per_image, 0)
    results = {}
    for top_p in args.top_p:
        generation = dataclasses.replace(boot.generation, top_p=top_p)
        generator, texts = torch.Generator().manual_seed(args.seed), []
        with torch.inference_mode():
            for start in range(0, len(images), 128):
                ids = models.captioner.generate(images[start : start + 128], generation, generator)
                texts += models.captioner_tokenizer.batch_decode(ids, skip_special_tokens=True)
        scenes = [Scene.from_json(web.scenes[i // args.per_image]) for i in range(len(texts))]
        truth = torch.tensor([is_true(text, scene) for text, scene in zip(texts, scenes, strict=True)])
        kinds = [type(parse(text)).__name__ for text in texts]
        values = scores(boot, models, images, texts)
        results[f"top_p {top_p}"] = {"captions": len(texts), "true": truth.float().mean().item(),
                                     **{name: report(v, truth, kinds, thresholds[name], args.per_image)
                                        for name, v in values.items()}}  # fmt: skip
        print_table(f"top_p {top_p}", results[f"top_p {top_p}"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
