"""Caption a split's images, score them against the human captions, and draw a gallery people can inspect."""

from __future__ import annotations

import textwrap
from pathlib import Path

import torch
from matplotlib.figure import Figure
from transformers import PreTrainedTokenizer

from blip.data.loader import eval_pipeline, make_loader
from blip.data.transforms import CLIP_MEAN, CLIP_STD, eval_transform
from blip.models.caption import BlipCaptioner
from blip.models.generation import GenerationConfig


@torch.no_grad()
def caption_split(
    model: BlipCaptioner,
    urls: list[str],
    tokenizer: PreTrainedTokenizer,
    image_size: int,
    max_images: int,
    config: GenerationConfig,
    device: torch.device,
) -> tuple[dict[str, str], dict[str, list[str]], dict[str, torch.Tensor]]:
    """(generated caption, reference captions, normalised image) per image id, for the first `max_images`."""
    was_training = model.training
    model.eval()
    predictions: dict[str, str] = {}
    references: dict[str, list[str]] = {}
    pixels: dict[str, torch.Tensor] = {}
    for batch in make_loader(eval_pipeline(urls, "pairs", eval_transform(image_size), 32), 0):
        keep = min(len(batch["key"]), max_images - len(predictions))
        if keep <= 0 or "image" not in batch:
            break
        images = batch["image"][:keep]
        for record, ids, captions, image in zip(batch["record"], model.generate(images.to(device), config),
                                                batch["text"], images, strict=False):  # fmt: skip
            predictions[record["image_id"]] = tokenizer.decode(ids, skip_special_tokens=True)
            references[record["image_id"]] = captions
            pixels[record["image_id"]] = image
    model.train(was_training)
    return predictions, references, pixels


def gallery_figure(
    predictions: dict[str, str], references: dict[str, list[str]], pixels: dict[str, torch.Tensor], count: int,
    model: str, split: str,
) -> Figure:  # fmt: skip
    """A grid of images, each with its generated caption and two of its human captions, titled with the model that
    captioned and the split the images come from."""
    ids = list(predictions)[:count]
    columns = 4
    rows = max(1, -(-len(ids) // columns))
    figure = Figure(figsize=(4 * columns, 4.6 * rows + 0.5), layout="constrained")  # room for 5 caption lines
    axes = figure.subplots(rows, columns, squeeze=False)
    mean, std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]
    for axis in axes.flat:
        axis.axis("off")
    for axis, image_id in zip(axes.flat, ids, strict=False):
        axis.imshow((pixels[image_id] * std + mean).clamp(0, 1).permute(1, 2, 0).numpy(), interpolation="nearest")
        lines = [f"generated: {predictions[image_id]}", *(f"human: {c}" for c in references[image_id][:2])]
        axis.set_title("\n".join(textwrap.fill(line, 44) for line in lines), fontsize=8, loc="left")
    figure.suptitle(f"{model}: generated vs human captions, the first {len(ids)} images of {split}", fontsize=12)
    return figure


def caption_gallery(
    predictions: dict[str, str], references: dict[str, list[str]], pixels: dict[str, torch.Tensor], path: Path,
    count: int, model: str, split: str,
) -> Path:  # fmt: skip
    """`gallery_figure` as a PNG; `model` names the captioner (e.g. its stage and weights file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    gallery_figure(predictions, references, pixels, count, model, split).savefig(path, dpi=100)
    return path
