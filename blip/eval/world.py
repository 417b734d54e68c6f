"""Measurements against the synthetic world's truth (what each image shows). For reports only: no stage may
use them to make a decision."""

from __future__ import annotations

import torch

from blip.data.language import holds, parse
from blip.data.scene import Scene
from blip.eval.retrieval import TopK


def semantic_recall_at_1(i2t: TopK, t2i: TopK, texts: list[str], scenes: list[dict]) -> dict[str, float]:
    """R@1 in percent where a hit is a retrieved caption true of the image (image->text) or a retrieved image the
    caption is true of (text->image), rather than the annotated pair: many short captions fit several images."""
    worlds = [Scene.from_json(s) for s in scenes]
    meanings = [parse(text) for text in texts]
    truth = torch.tensor([[m is not None and holds(m, w) for m in meanings] for w in worlds])  # [images, texts]
    txt = truth.gather(1, i2t.indices[:, :1]).double().mean().item()
    img = truth.T.gather(1, t2i.indices[:, :1]).double().mean().item()
    # chance: how often a random caption is true of a random image
    return {"semantic_txt_r1": 100.0 * txt, "semantic_img_r1": 100.0 * img,
            "semantic_chance_r1": 100.0 * truth.double().mean().item()}  # fmt: skip
