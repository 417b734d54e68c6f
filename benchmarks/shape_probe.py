"""What the image encoder knows of the built-in world's objects (issue 17): a logistic regression on the ViT's tokens
names the shape, colour and size of the one object of a web image (fit on two thirds of the one-object images,
scored on the rest), beside the same regression on the raw pixels; for weights with a text decoder, also how often
it names the shape given the rest of the caption. The world's labels are read to measure only.

    python -m benchmarks.shape_probe models/pretrain.safetensors models/caption.safetensors [--shards data/shards]
    python -m benchmarks.shape_probe --supervised-steps 1500 [--set model.patch_embed=conv]   # see below

`--supervised-steps N` also trains a fresh ViT of the model section (`--set` overrides params) N steps on the labels
themselves (the one-object images' shape, batch 64, AdamW 5e-4) and scores it on the held-out third: how much of the
shape the architecture learns in that many steps when it is told the answer: a reference for what pretraining,
which must find the shape in captions, teaches it in as many steps.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from torch import nn
from tqdm import tqdm
from transformers import PreTrainedTokenizer

from blip.config.params import load_params
from blip.config.schema import ModelConfig
from blip.data.locations import split_urls
from blip.data.scene import SHAPES
from blip.eval.retrieval import load_pair_split
from blip.models.caption import PROMPT, BlipCaptioner
from blip.models.factory import load_trained, read_weights
from blip.models.vit import create_vit

ATTRIBUTES = ("shape", "colour", "size")


def probe(features: torch.Tensor, labels: dict[str, list[str]]) -> dict[str, float]:
    """Held-out accuracy per attribute of a logistic regression on `features` [N, D]."""
    x, fit = features.double().numpy(), len(features) * 2 // 3
    return {name: LogisticRegression(max_iter=3000).fit(x[:fit], y[:fit]).score(x[fit:], y[fit:])
            for name, y in labels.items()}  # fmt: skip


def supervised_shape(images: torch.Tensor, shapes: list[str], cfg: ModelConfig, steps: int) -> float:
    """Held-out shape accuracy of a fresh ViT with a linear head on [CLS], trained `steps` steps on the labels."""
    names = sorted(set(shapes))
    labels, fit = torch.tensor([names.index(s) for s in shapes]), len(shapes) * 2 // 3
    torch.manual_seed(0)
    vit, head = create_vit(cfg), nn.Linear(cfg.vision_width, len(names))
    optimizer = torch.optim.AdamW([*vit.parameters(), *head.parameters()], lr=5e-4, weight_decay=0.05)
    for _ in tqdm(range(steps), desc="supervised ViT"):
        batch = torch.randint(0, fit, (64,))
        loss = F.cross_entropy(head(vit(images[batch])[:, 0]), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    vit.eval()
    with torch.inference_mode():
        return (head(vit(images[fit:])[:, 0]).argmax(-1) == labels[fit:]).float().mean().item()


@torch.inference_mode()
def decoder_names_shape(
    captioner: BlipCaptioner, tokenizer: PreTrainedTokenizer, images: torch.Tensor, objects: list[dict]
) -> float:
    """How often the captioner, fed "<prompt>a <size> <colour>", ranks the right shape first among the world's
    shapes: what its decoder reads of the shape, the rest given."""
    shape_ids = torch.tensor(tokenizer.convert_tokens_to_ids(list(SHAPES)))
    prompts = [f"{PROMPT}a {o['size']} {o['colour']}" for o in objects]
    tokens = tokenizer(prompts, padding="longest", return_tensors="pt")
    if not tokens.attention_mask.all():
        raise SystemExit("shape_probe: size and colour words of unequal token lengths")
    ids = tokens.input_ids[:, :-1]  # without [SEP]: the last position predicts the shape
    named = torch.cat([captioner.logits(images[s : s + 256], ids[s : s + 256], torch.ones_like(ids[s : s + 256]))
                       [:, -1, shape_ids].argmax(-1) for s in range(0, len(ids), 256)])  # fmt: skip
    return sum(SHAPES[int(i)] == o["shape"] for i, o in zip(named, objects, strict=True)) / len(objects)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("weights", nargs="*", type=Path)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--shards", type=Path, default=Path("data/shards"))
    parser.add_argument("--images", type=int, default=4000, help="web images read (about a third hold one object)")
    parser.add_argument("--supervised-steps", type=int, default=0, help="also train a ViT on the shapes this long")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="params override")
    args = parser.parse_args()
    params = load_params(args.params, args.set)
    size = params.model.image_size
    web = load_pair_split(split_urls(args.shards, "web"), size, args.images)
    one = [i for i, scene in enumerate(web.scenes) if scene and len(scene["objects"]) == 1]
    labels = {name: [web.scenes[i]["objects"][0][name] for i in one] for name in ATTRIBUTES}
    results = {"images": len(one), "pixels": probe(web.images[one].flatten(1), labels)}
    for weights in args.weights:
        source = read_weights(weights, params.model)
        # Build what the file holds: a captioner where there is a decoder (pretraining, caption), else retrieval.
        decoder = any(key.startswith("text_decoder.") for key in source.state)
        model, tokenizer = load_trained("caption" if decoder else "retrieval", weights, params.model,
                                        params.tokenizer.name)  # fmt: skip
        model.eval()
        with torch.inference_mode():
            tokens = torch.cat([model.visual_encoder(web.images[one[s : s + 256]]) for s in range(0, len(one), 256)])
        results[str(weights)] = probe(tokens.flatten(1), labels)
        if decoder:
            lone = [web.scenes[i]["objects"][0] for i in one]
            results[str(weights)]["decoder names shape"] = decoder_names_shape(model, tokenizer, web.images[one], lone)
    if args.supervised_steps:
        name = f"supervised ViT, {args.supervised_steps} steps" + "".join(f", {item}" for item in args.set)
        results[name] = supervised_shape(web.images[one], labels["shape"], params.model, args.supervised_steps)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
