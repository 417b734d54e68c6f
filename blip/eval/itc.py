"""Zero-shot ITC retrieval on held-out pairs: how well the contrastive features alone find the match."""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizer

from blip.eval.retrieval import load_pair_split
from blip.models.contrastive import DualEncoder


def recall_at_1(similarity: torch.Tensor, text_image: torch.Tensor) -> dict[str, float]:
    """`similarity` [images, texts]; `text_image[t]` is the image text t describes. Image->text counts a hit
    when the best text is any caption of the image."""
    images = torch.arange(similarity.shape[0])
    best_text = similarity.argmax(1)
    best_image = similarity.argmax(0)
    return {
        "i2t_r1": (text_image[best_text] == images).float().mean().item(),
        "t2i_r1": (best_image == text_image).float().mean().item(),
    }


@torch.no_grad()
def itc_recall(
    model: DualEncoder,
    urls: list[str],
    tokenizer: PreTrainedTokenizer,
    image_size: int,
    max_images: int,
    max_length: int,
    device: torch.device,
) -> dict[str, float]:
    """R@1 both ways over the first `max_images` images of a split and all their captions."""
    split = load_pair_split(urls, image_size, max_images)
    texts = split.texts
    was_training = model.training
    model.eval()
    image_feat = torch.cat([model.image_features(chunk.to(device))[1] for chunk in split.images.split(64)])
    text_feat = []
    for start in range(0, len(texts), 256):
        tokens = tokenizer(texts[start : start + 256], padding="longest", truncation=True, max_length=max_length,
                           return_tensors="pt").to(device)  # fmt: skip
        text_feat.append(model.text_features(tokens.input_ids, tokens.attention_mask))
    model.train(was_training)
    scores = recall_at_1((image_feat @ torch.cat(text_feat).T).float().cpu(), split.text_image)
    return scores | {"images": float(len(split.image_ids)), "chance_r1": 1.0 / len(split.image_ids)}
