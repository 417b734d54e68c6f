"""Export our weights as `transformers` BLIP folders that load offline with `from_pretrained`.

- `caption`   -> `BlipForConditionalGeneration` (vision_model + text_decoder)
- `retrieval` -> `BlipForImageTextRetrieval`    (vision_model + text_encoder + vision_proj/text_proj + itm_head)
- `vqa`       -> `BlipForQuestionAnswering`     (vision_model + text_encoder + text_decoder)
Text keys keep their names; vision keys are renamed to the port's (`blocks` -> `layers`, `attn.proj` ->
`self_attn.projection`, ...). The vision LayerNorm eps is set to BLIP's 1e-6 (the port's default differs).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from transformers import (
    BlipConfig,
    BlipForConditionalGeneration,
    BlipForImageTextRetrieval,
    BlipForQuestionAnswering,
    BlipImageProcessor,
    BlipProcessor,
    PreTrainedTokenizer,
)

from blip.config.schema import ModelConfig
from blip.data.tokenizer import SpecialTokens
from blip.data.transforms import CLIP_MEAN, CLIP_STD

HF_CLASSES = {
    "caption": (BlipForConditionalGeneration, ("text_decoder.",)),
    "retrieval": (BlipForImageTextRetrieval, ("text_encoder.", "vision_proj.", "text_proj.", "itm_head.")),
    "vqa": (BlipForQuestionAnswering, ("text_encoder.", "text_decoder.")),
}
VISION_NAMES = [  # (ours, transformers'), each a whole key or a key prefix; {n} is a block index
    ("visual_encoder.cls_token", "vision_model.embeddings.class_embedding"),
    ("visual_encoder.pos_embed", "vision_model.embeddings.position_embedding"),
    ("visual_encoder.patch_embed.proj.", "vision_model.embeddings.patch_embedding."),
    ("visual_encoder.norm.", "vision_model.post_layernorm."),
    ("visual_encoder.blocks.{n}.norm1.", "vision_model.encoder.layers.{n}.layer_norm1."),
    ("visual_encoder.blocks.{n}.norm2.", "vision_model.encoder.layers.{n}.layer_norm2."),
    ("visual_encoder.blocks.{n}.attn.qkv.", "vision_model.encoder.layers.{n}.self_attn.qkv."),
    ("visual_encoder.blocks.{n}.attn.proj.", "vision_model.encoder.layers.{n}.self_attn.projection."),
    ("visual_encoder.blocks.{n}.mlp.", "vision_model.encoder.layers.{n}.mlp."),
]


def rename_vision(key: str, to_hf: bool) -> str | None:
    """A vision key in the other naming (ours <-> transformers'); None when the table has no entry for it."""
    for ours, theirs in VISION_NAMES:
        source, target = (ours, theirs) if to_hf else (theirs, ours)
        pattern = re.escape(source).replace(r"\{n\}", r"(\d+)")
        found = re.match(pattern + ("" if source.endswith(".") else "$"), key)
        if found:
            index = found.group(1) if found.groups() else ""
            return target.replace("{n}", index) + key[found.end() :]
    return None


def hf_config(cfg: ModelConfig, tokens: SpecialTokens) -> BlipConfig:
    text = {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.text_width,
        "encoder_hidden_size": cfg.vision_width,
        "intermediate_size": cfg.text_intermediate or 4 * cfg.text_width,
        "num_hidden_layers": cfg.text_depth,
        "num_attention_heads": cfg.text_heads,
        "max_position_embeddings": cfg.max_text_positions,
        "hidden_dropout_prob": cfg.text_dropout,
        "attention_probs_dropout_prob": cfg.text_dropout,
        "layer_norm_eps": cfg.text_layer_norm_eps,
        "bos_token_id": tokens.bos,
        "sep_token_id": tokens.sep,
        "eos_token_id": tokens.sep,
        "pad_token_id": tokens.pad,
    }
    vision = {
        "hidden_size": cfg.vision_width,
        "intermediate_size": 4 * cfg.vision_width,
        "num_hidden_layers": cfg.vision_depth,
        "num_attention_heads": cfg.vision_heads,
        "image_size": cfg.image_size,
        "patch_size": cfg.patch_size,
        "layer_norm_eps": cfg.vision_layer_norm_eps,
    }
    return BlipConfig(text_config=text, vision_config=vision, image_text_hidden_size=cfg.embed_dim)


def to_hf_state(state: dict[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    keep = HF_CLASSES[kind][1]
    out = {}
    for key, value in state.items():
        if key.startswith("visual_encoder."):
            renamed = rename_vision(key, to_hf=True)
            if renamed is None:
                raise KeyError(f"no transformers name for {key}")
            out[renamed] = value
        elif key.startswith(keep):
            out[key] = value
    if "text_decoder.cls.predictions.bias" in out:
        out["text_decoder.cls.predictions.decoder.bias"] = out["text_decoder.cls.predictions.bias"]
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def export_hf(
    state: dict[str, torch.Tensor], cfg: ModelConfig, tokenizer: PreTrainedTokenizer, kind: str, out_dir: Path
) -> Path:
    """Write a `from_pretrained` folder (weights, config, processor with our tokenizer) for `kind`."""
    model_class, _ = HF_CLASSES[kind]
    if cfg.patch_embed != "linear":
        raise ValueError(f"transformers' BLIP has a linear patch layer only; this model's image encoder starts with "
                         f"a {cfg.patch_embed} stem (model.patch_embed). Train with model.patch_embed=linear to "
                         "export.")  # fmt: skip
    if kind == "vqa" and cfg.text_width != cfg.vision_width:
        raise ValueError(f"transformers' BlipForQuestionAnswering cannot hold a VQA model whose text width "
                         f"({cfg.text_width}) differs from its vision width ({cfg.vision_width})")  # fmt: skip
    model = model_class(hf_config(cfg, SpecialTokens.of(tokenizer)))
    missing, unexpected = model.load_state_dict(to_hf_state(state, kind), strict=False)
    missing = [k for k in missing if k not in ("text_decoder.cls.predictions.decoder.weight",)]
    if missing or unexpected:
        raise KeyError(f"export to {model_class.__name__}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    image_processor = BlipImageProcessor(
        size={"height": cfg.image_size, "width": cfg.image_size}, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD)
    )
    BlipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out_dir)
    return out_dir
