"""ONNX export of the captioner and of the retrieval model, as the graphs an inference runtime needs.

A whole-model export fails at generation (a Python loop over steps, a cache that grows): onnxruntime #12594. So the
captioner is cut where the loop is: `vision` (images -> image tokens), `decoder_prefill` (the prompt over the image
tokens -> next-token logits, the self-attention keys/values and the image keys/values of every layer) and
`decoder_step` (one new token with the cached keys/values -> logits and the grown cache). The search loop (greedy,
beam, nucleus) stays in Python, the same code as for torch (blip.onnx.runner). The retrieval model is `image`
(image tokens and the normalised ITC feature), `text` (the ITC feature) and `itm` (match logits of image tokens
and a text). Batch, text length and cache length are dynamic axes; the image size is the model's.

The folder also holds `vocab.txt` (with [DEC]/[ENC], as `load_tokenizer` adds them) and `blip_onnx.json`: task,
image size, layers, special tokens, prompt.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedTokenizer

from blip.data.tokenizer import DEC_TOKEN, ENC_TOKEN, SpecialTokens
from blip.models.caption import BlipCaptioner
from blip.models.contrastive import DualEncoder
from blip.models.med import KVCache

OPSET = 18
META = "blip_onnx.json"
TASKS = ("caption", "retrieval")


def kv_names(kind: str, layers: int) -> list[str]:
    """`past`/`present`/`cross` keys and values, layer by layer: past_key_0, past_value_0, past_key_1, ..."""
    return [f"{kind}_{part}_{i}" for i in range(layers) for part in ("key", "value")]


def _pairs(flat: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]


class Vision(nn.Module):
    def __init__(self, model: BlipCaptioner) -> None:
        super().__init__()
        self.visual_encoder = model.visual_encoder

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.visual_encoder(images)


class DecoderPrefill(nn.Module):
    def __init__(self, model: BlipCaptioner) -> None:
        super().__init__()
        self.decoder = model.text_decoder

    def forward(self, input_ids: torch.Tensor, image_embeds: torch.Tensor) -> tuple[torch.Tensor, ...]:
        cache = KVCache()
        logits = self.decoder.next_token_logits(input_ids, image_embeds, None, cache)
        return logits, *[t for kv in cache.self_kv for t in kv], *[t for kv in cache.cross_kv for t in kv]


class DecoderStep(nn.Module):
    def __init__(self, model: BlipCaptioner) -> None:
        super().__init__()
        self.decoder = model.text_decoder

    def forward(self, input_ids: torch.Tensor, past: list[torch.Tensor], cross: list[torch.Tensor]) -> tuple:
        cache = KVCache(_pairs(past), _pairs(cross))
        # The image tokens are only read to fill an empty cross-attention cache; here it is full.
        logits = self.decoder.next_token_logits(input_ids, cross[0], None, cache)
        return logits, *[t for kv in cache.self_kv for t in kv]


class ImageEncoder(nn.Module):
    def __init__(self, model: DualEncoder) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.image_features(images)


class TextEncoder(nn.Module):
    def __init__(self, model: DualEncoder) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model.text_features(input_ids, attention_mask)


class ItmHead(nn.Module):
    def __init__(self, model: DualEncoder) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, image_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        return self.model.itm_logits(image_embeds, input_ids, attention_mask)


def _export(module: nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str], dynamic: dict) -> None:
    with warnings.catch_warnings():  # axes sharing one Dim ("batch") are named once: harmless, said per graph
        warnings.filterwarnings("ignore", message="# The axis name")
        torch.onnx.export(module.eval(), args, str(path), dynamo=True, opset_version=OPSET, input_names=inputs,
                          output_names=outputs, dynamic_shapes=dynamic, external_data=False, verbose=False)  # fmt: skip


def export_onnx(model: nn.Module, task: str, tokenizer: PreTrainedTokenizer, out: Path) -> list[Path]:
    """Write `task`'s graphs, vocabulary and metadata to `out`; the paths written."""
    if task not in TASKS:
        raise ValueError(f"no ONNX export for task {task!r} (one of {', '.join(TASKS)})")
    cfg, model = model.model_config, model.eval()
    out.mkdir(parents=True, exist_ok=True)
    batch, text = torch.export.Dim("batch", min=1, max=65536), torch.export.Dim("text", min=2, max=4096)
    images = torch.zeros(2, 3, cfg.image_size, cfg.image_size)
    layers, heads = cfg.text_depth, cfg.text_heads
    written = []
    with torch.no_grad():
        image_tokens = model.visual_encoder(images).shape[1]
        if task == "caption":
            embeds = torch.zeros(2, image_tokens, cfg.vision_width)
            prompt = model.prompt[None].expand(2, -1).contiguous()
            _export(Vision(model), (images,), out / "vision.onnx", ["images"], ["image_embeds"], {"images": {0: batch}})
            _export(DecoderPrefill(model), (prompt, embeds), out / "decoder_prefill.onnx",
                    ["input_ids", "image_embeds"], ["logits", *kv_names("present", layers), *kv_names("cross", layers)],
                    {"input_ids": {0: batch, 1: text}, "image_embeds": {0: batch}})  # fmt: skip
            past = [torch.zeros(2, heads, prompt.shape[1], cfg.text_width // heads) for _ in range(2 * layers)]
            cross = [torch.zeros(2, heads, image_tokens, cfg.text_width // heads) for _ in range(2 * layers)]
            length = torch.export.Dim("past", min=1, max=4096)
            _export(DecoderStep(model), (prompt[:, :1], past, cross), out / "decoder_step.onnx",
                    ["input_ids", *kv_names("past", layers), *kv_names("cross", layers)],
                    ["logits", *kv_names("present", layers)],
                    {"input_ids": {0: batch}, "past": [{0: batch, 2: length}] * (2 * layers),
                     "cross": [{0: batch}] * (2 * layers)})  # fmt: skip
            written = [out / "vision.onnx", out / "decoder_prefill.onnx", out / "decoder_step.onnx"]
        else:
            ids = torch.full((2, 5), tokenizer.cls_token_id)
            mask = torch.ones_like(ids)
            embeds = torch.zeros(2, image_tokens, cfg.vision_width)
            _export(ImageEncoder(model), (images,), out / "image.onnx", ["images"], ["image_embeds", "image_feat"],
                    {"images": {0: batch}})  # fmt: skip
            _export(TextEncoder(model), (ids, mask), out / "text.onnx", ["input_ids", "attention_mask"], ["text_feat"],
                    {"input_ids": {0: batch, 1: text}, "attention_mask": {0: batch, 1: text}})  # fmt: skip
            _export(ItmHead(model), (embeds, ids, mask), out / "itm.onnx",
                    ["image_embeds", "input_ids", "attention_mask"], ["itm_logits"],
                    {"image_embeds": {0: batch}, "input_ids": {0: batch, 1: text},
                     "attention_mask": {0: batch, 1: text}})  # fmt: skip
            written = [out / "image.onnx", out / "text.onnx", out / "itm.onnx"]
    written.append(write_vocab(tokenizer, out))
    meta = {"task": task, "image_size": cfg.image_size, "layers": layers,
            "special_tokens": vars(SpecialTokens.of(tokenizer)),
            "prompt_ids": model.prompt.tolist() if task == "caption" else None}  # fmt: skip
    (out / META).write_text(json.dumps(meta, indent=2) + "\n")
    return [*written, out / META]


def write_vocab(tokenizer: PreTrainedTokenizer, out: Path) -> Path:
    """The vocabulary in id order without [DEC] and [ENC], which `load_tokenizer` adds after it (same ids)."""
    added = {DEC_TOKEN, ENC_TOKEN}
    by_id = sorted((i, token) for token, i in tokenizer.get_vocab().items() if token not in added)
    if [i for i, _ in by_id] != list(range(len(by_id))):
        raise ValueError("the tokenizer's ids are not contiguous below [DEC]/[ENC]: its vocab.txt cannot be rebuilt")
    (out / "vocab.txt").write_text("".join(f"{token}\n" for _, token in by_id), encoding="utf-8")
    return out / "vocab.txt"
