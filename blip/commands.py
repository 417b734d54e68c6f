"""Inference and export from the command line: `blip caption`, `blip itm`, `blip export-hf`, `blip export-onnx`,
`blip embed`, `blip search`.

Each accepts our weights (safetensors with the model config inside), transformers BLIP folders (config.json and
tokenizer inside) and official-layout files (`.pth`, with the model config from `--params`/`--set`, e.g.
`--params configs/base.yaml` for BLIP base checkpoints). Weights that carry their config need no params file.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image
from torch import nn
from transformers import PreTrainedTokenizer

from blip import search
from blip.config import load_params
from blip.config.params import DEFAULT_PARAMS
from blip.config.schema import ModelConfig, TokenizerConfig
from blip.data.transforms import eval_transform
from blip.models.export_hf import HF_CLASSES, export_hf
from blip.models.factory import load_trained
from blip.models.generation import GenerationConfig
from blip.stages.common import stage_parser

if TYPE_CHECKING:
    from blip.onnx.runner import OnnxCaptioner, OnnxRetrieval


def _parser(command: str, description: str, onnx: bool = False) -> argparse.ArgumentParser:
    parser = stage_parser(command, description)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--weights", type=Path,
                        help="our .safetensors, a transformers BLIP folder, or an official .pth")  # fmt: skip
    if onnx:
        source.add_argument("--onnx", type=Path, help="a folder written by `blip export-onnx` (run by onnxruntime)")
    return parser


def _load(task: str, args: argparse.Namespace) -> tuple[nn.Module, ModelConfig, PreTrainedTokenizer, int]:
    """(model holding the file's weights, its config, the tokenizer, the text tokens it keeps)."""
    if args.params == DEFAULT_PARAMS and not args.params.is_file() and not args.overrides:
        model, tokenizer = load_trained(task, args.weights, None, None)  # the weights must describe themselves
        return model.eval(), model.model_config, tokenizer, TokenizerConfig().max_length
    params = load_params(args.params, args.overrides)
    model, tokenizer = load_trained(task, args.weights, params.model, params.tokenizer.name)
    return model.eval(), model.model_config, tokenizer, params.tokenizer.max_length


def _onnx(folder: Path, task: str) -> OnnxCaptioner | OnnxRetrieval:
    from blip.onnx.runner import load_onnx  # onnxruntime is imported only when asked for

    model = load_onnx(folder)
    if model.meta["task"] != task:
        raise SystemExit(f"{folder} holds a {model.meta['task']} model, not a {task} one")
    return model


def _images(paths: list[Path], cfg: ModelConfig) -> torch.Tensor:
    transform = eval_transform(cfg.image_size)
    return torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])


def caption_main(argv: Sequence[str] | None = None) -> int:
    parser = _parser("caption", "Print one caption per image (tab-separated after the image path).", onnx=True)
    parser.add_argument("images", nargs="+", type=Path)
    parser.add_argument("--method", choices=["beam", "greedy", "nucleus"], default="beam")
    parser.add_argument("--num-beams", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=20, help="tokens, prompt included (as in BLIP)")
    parser.add_argument("--min-length", type=int, default=5)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0, help="for nucleus sampling")
    args = parser.parse_args(argv)
    config = GenerationConfig(args.method, args.num_beams, args.max_length, args.min_length, args.top_p,
                              args.repetition_penalty)  # fmt: skip
    generator = torch.Generator().manual_seed(args.seed)
    if args.onnx is not None:
        model = _onnx(args.onnx, "caption")
        pixels, tokenizer = (
            torch.stack([model.transform(Image.open(p).convert("RGB")) for p in args.images]),
            model.tokenizer,
        )
    else:
        model, cfg, tokenizer, _ = _load("caption", args)
        pixels = _images(args.images, cfg)
    captions = model.generate(pixels, config, generator)
    for path, ids in zip(args.images, captions, strict=True):
        print(f"{path}\t{tokenizer.decode(ids, skip_special_tokens=True)}")
    return 0


def itm_main(argv: Sequence[str] | None = None) -> int:
    parser = _parser(
        "itm", "Print the ITM match probability and ITC similarity of each text with the image.", onnx=True
    )
    parser.add_argument("image", type=Path)
    parser.add_argument("texts", nargs="+")
    args = parser.parse_args(argv)
    if args.onnx is not None:
        model = _onnx(args.onnx, "retrieval")
        tokenizer, max_length = model.tokenizer, TokenizerConfig().max_length
        image = model.transform(Image.open(args.image).convert("RGB"))[None]
    else:
        model, cfg, tokenizer, max_length = _load("retrieval", args)
        image = _images([args.image], cfg)
    batch = tokenizer(args.texts, padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
    images = image.expand(len(args.texts), -1, -1, -1).contiguous()
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


def embed_main(argv: Sequence[str] | None = None) -> int:
    parser = _parser("embed", "Write the ITC embeddings of images or texts to a Parquet file (id, path/text, vector).")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help="a folder of image files, or a shard split (name or location)")
    source.add_argument("--texts", type=Path, help="a UTF-8 text file, one text per line")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)
    model, tokenizer, max_length = search.load_model(args.weights, args.params, args.overrides)
    if args.images is not None and Path(args.images).is_dir() and not search.has_images(Path(args.images)):
        parser.error(f"{args.images}: no image files and no shards")
    meta = {"weights": str(args.weights), "weights_sha256": search.weights_digest(args.weights),
            "dim": model.vision_proj.out_features}  # fmt: skip
    if args.images is not None:
        root = load_params(args.params).data.shard_root if args.params.is_file() else Path("data/shards")
        batches = search.image_batches(args.images, root, model.model_config.image_size, args.batch_size)
        kind = "image"

        def encode(labels: list[str], pixels: torch.Tensor | None) -> torch.Tensor:
            return model.image_features(pixels)[1]
    else:
        batches, kind = search.text_batches(args.texts, args.batch_size), "text"

        def encode(labels: list[str], pixels: torch.Tensor | None) -> torch.Tensor:
            # Every batch the same shape (full, padded to max_length): a text's vector then does not depend on its
            # neighbours, and equal texts get equal vectors, which rank by id like the retrieval stage's.
            full = labels + [""] * (args.batch_size - len(labels))
            tokens = tokenizer(full, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
            return model.text_features(tokens.input_ids, tokens.attention_mask)[: len(labels)]

    with torch.inference_mode():
        rows = search.write_embeddings(batches, kind, encode, args.out, meta)
    note = ""
    if args.images is not None and Path(args.images).is_dir() and not search.is_shards(Path(args.images)):
        skipped = len(search.image_files(Path(args.images))) - rows
        note = f" ({skipped} unreadable images skipped)" if skipped else ""
    print(f"wrote {rows} {kind} embeddings to {args.out}{note}")
    return 0


def search_main(argv: Sequence[str] | None = None) -> int:
    parser = stage_parser("search", "Rank an embeddings file for a query by ITC similarity, optionally re-ranked "
                                    "by ITM probability.")  # fmt: skip
    parser.add_argument("--index", type=Path, required=True, help="an embeddings file from `blip embed`")
    query = parser.add_mutually_exclusive_group(required=True)
    query.add_argument("--text")
    query.add_argument("--image", type=Path)
    query.add_argument("--queries", type=Path, help="an embeddings file whose every row is a query (needs --out)")
    parser.add_argument("--weights", type=Path, help="the weights the index was embedded with (for --text, --image)")
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--rerank", action="store_true", help="re-rank the top k by ITM probability")
    parser.add_argument("--out", type=Path, help="with --queries: Parquet of query_id, rank, id, itc_similarity")
    args = parser.parse_args(argv)
    try:
        meta = search.index_meta(args.index)
    except (ValueError, OSError) as exc:
        parser.error(str(exc))
    if args.queries is not None:
        if args.rerank or args.out is None:
            parser.error("--queries writes --out and does not re-rank (ITM re-ranks one --text or --image)")
        queries_meta = search.index_meta(args.queries)
        if queries_meta["weights_sha256"] != meta["weights_sha256"]:
            parser.error(f"{args.queries} and {args.index} were embedded with different weights "
                         f"({queries_meta['weights']} and {meta['weights']})")  # fmt: skip
        search.write_rankings(args.queries, args.index, args.k, args.out)
        print(f"wrote the top {args.k} of {args.index} for every row of {args.queries} to {args.out}")
        return 0
    if args.weights is None:
        parser.error("--text and --image need --weights (the ones the index was embedded with)")
    if search.weights_digest(args.weights) != meta["weights_sha256"]:
        parser.error(f"{args.index} was embedded with {meta['weights']}, not with {args.weights} (SHA-256 differs)")
    model, tokenizer, max_length = search.load_model(args.weights, args.params, args.overrides)
    try:
        rows = search.answer(model, tokenizer, max_length, args.index, args.text, args.image, args.k, args.rerank)
    except (ValueError, OSError) as exc:  # an image PIL cannot read, a re-rank of the wrong kind
        parser.error(str(exc))
    for row in rows:
        print("\t".join(row))
    return 0


def export_onnx_main(argv: Sequence[str] | None = None) -> int:
    parser = _parser("export-onnx", "Write ONNX graphs (dynamic batch and length) and the vocabulary to a folder.")
    parser.add_argument("--task", choices=["caption", "retrieval"], required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    from blip.onnx.export import export_onnx

    model, _, tokenizer, _ = _load(args.task, args)
    for path in export_onnx(model, args.task, tokenizer, args.out):
        print(f"wrote {path}")
    return 0
