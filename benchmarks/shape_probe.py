"""What the image encoder knows of the built-in world's objects (issue 17): a logistic regression on the ViT's tokens
names the shape, colour and size of the one object of a web image (fit on two thirds of the one-object images,
scored on the rest), beside the same regression on the raw pixels. The world's labels are read to measure only.

    python -m benchmarks.shape_probe models/pretrain.safetensors models/caption.safetensors [--shards data/shards]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from sklearn.linear_model import LogisticRegression

from blip.config.params import load_params
from blip.data.locations import split_urls
from blip.eval.retrieval import load_pair_split
from blip.models.factory import load_trained, read_weights

ATTRIBUTES = ("shape", "colour", "size")


def probe(features: torch.Tensor, labels: dict[str, list[str]]) -> dict[str, float]:
    """Held-out accuracy per attribute of a logistic regression on `features` [N, D]."""
    x, fit = features.double().numpy(), len(features) * 2 // 3
    return {name: LogisticRegression(max_iter=3000).fit(x[:fit], y[:fit]).score(x[fit:], y[fit:])
            for name, y in labels.items()}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("weights", nargs="+", type=Path)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--shards", type=Path, default=Path("data/shards"))
    parser.add_argument("--images", type=int, default=4000, help="web images read (about a third hold one object)")
    args = parser.parse_args()
    params = load_params(args.params)
    size = params.model.image_size
    web = load_pair_split(split_urls(args.shards, "web"), size, args.images)
    one = [i for i, scene in enumerate(web.scenes) if scene and len(scene["objects"]) == 1]
    labels = {name: [web.scenes[i]["objects"][0][name] for i in one] for name in ATTRIBUTES}
    results = {"images": len(one), "pixels": probe(web.images[one].flatten(1), labels)}
    for weights in args.weights:
        source = read_weights(weights, params.model)  # a caption file has no text encoder: build what it holds
        task = "retrieval" if any(key.startswith("text_encoder.") for key in source.state) else "caption"
        model, _ = load_trained(task, weights, params.model, params.tokenizer.name)
        with torch.inference_mode():
            tokens = torch.cat([model.visual_encoder(web.images[one[s : s + 256]]) for s in range(0, len(one), 256)])
        results[str(weights)] = probe(tokens.flatten(1), labels)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
