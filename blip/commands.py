"""Inference and export from the command line: `blip caption`, `blip itm`, `blip export-hf`.

Each accepts our weights (safetensors with the model config inside), transformers BLIP folders (config.json and
tokenizer inside) and official-layout files (`.pth`, with the model config from `--params`/`--set`, e.g.
`--params configs/base.yaml` for BLIP base checkpoints). Weights that carry their config need no params file.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from transformers import PreTrainedTokenizer

from blip.config import load_params
from blip.config.params import DEFAULT_PARAMS
from blip.config.schema import ModelConfig, TokenizerConfig
from blip.data.transforms import eval_transform
from blip.models.export_hf import HF_CLASSES, export_hf
from blip.models.factory import load_trained
from blip.models.generation import GenerationConfig
from blip.stages.common import stage_parser


def _parser(command: str, description: str) -> argparse.ArgumentParser:
    parser = stage_parser(command, description)
    parser.add_argument("--weights", type=Path, required=True,
                        help="our .safetensors, a transformers BLIP folder, or an official .pth")  # fmt: skip
    return parser


def _load(task: str, args: argparse.Namespace) -> tuple[nn.Module, ModelConfig, PreTrainedTokenizer, int]:
    """(model holding the file's weights, its config, the tokenizer, the text tokens it keeps)."""
    if args.params == DEFAULT_PARAMS and not args.params.is_file() and not args.overrides:
        model, tokenizer = load_trained(task, args.weights, None, None)  # the weights must describe themselves
        return model.eval(), model.model_config, tokenizer, TokenizerConfig().max_length
    params = load_params(args.params, args.overrides)
    model, tokenizer = load_trained(task, args.weights, params.model, params.tokenizer.name)
    return model.eval(), model.model_config, tokenizer, params.tokenizer.max_length


def _images(paths: list[Path], cfg: ModelConfig) -> torch.Tensor:
    transform = eval_transform(cfg.image_size)
    return torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])


def caption_main(argv: Sequence[str] | None = None) -> int:
    parser = _parser("caption", "Print one caption per image (tab-separated after the image path).")
    parser.add_argument("images", nargs="+", type=Path)
    parser.add_argument("--method", choices=["beam", "greedy", "nucleus"], default="beam")
    parser.add_argument("--num-beams", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=20, help="tokens, prompt included (as in BLIP)")
    parser.add_argument("--min-length", type=int, default=5)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0, help="for nucleus sampling")
    args = parser.parse_args(argv)
    model, cfg, tokenizer, _ = _load("caption", args)
    config = GenerationConfig(args.method, args.num_beams, args.max_length, args.min_length, args.top_p,
                              args.repetition_penalty)  # fmt: skip
    generator = torch.Generator().manual_seed(args.seed)
    captions = model.generate(_images(args.images, cfg), config, generator)
    for path, ids in zip(args.images, captions, strict=True):
        print(f"{path}\t{tokenizer.decode(ids, skip_special_tokens=True)}")
    return 0


def itm_main(argv: Sequence[str] | None = None) -> int:
    parser = _parser("itm", "Print the ITM match probability and ITC similarity of each text with the image.")
    parser.add_argument("image", type=Path)
    parser.add_argument("texts", nargs="+")
    args = parser.parse_args(argv)
    model, cfg, tokenizer, max_length = _load("retrieval", args)
    batch = tokenizer(args.texts, padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
    images = _images([args.image], cfg).expand(len(args.texts), -1, -1, -1)
    probability, similarity = model.score_pairs(images, batch.input_ids, batch.attention_mask)
    print("itm_probability\titc_similarity\ttext")
    for text, p, s in zip(args.texts, probability.tolist(), similarity.tolist(), strict=True):
        print(f"{p:.4f}\t{s:.4f}\t{text}")
    return 0


def export_hf_main(argv: Sequence[str] | None = None) -> int:
    parser = _parser("export-hf", "Write a transformers BLIP folder that loads offline with from_pretrained.")
    parser.add_argument("--task", choices=sorted(HF_CLASSES), required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    model, cfg, tokenizer, _ = _load(args.task, args)  # export names match our task names
    export_hf(model.state_dict(), cfg, tokenizer, args.task, args.out)
    print(f"wrote {args.out} ({HF_CLASSES[args.task][0].__name__})")
    return 0
