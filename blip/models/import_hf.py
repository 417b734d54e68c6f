"""Import of `transformers` BLIP folders: what `save_pretrained` writes for `BlipForConditionalGeneration`,
`BlipForImageTextRetrieval` and `BlipForQuestionAnswering` (config.json, weights, tokenizer, image processor).

A folder becomes what every weights source gives our loaders: a state dict in BLIP's official layout (vision keys
renamed back from the port's, text keys unchanged), the model config read from config.json (sizes, vocabulary,
LayerNorm eps) with the image size of the folder's image processor, and the folder itself as the tokenizer when
it holds one. Any other architecture (BLIP-2, CLIP, BERT, `BlipModel`) is refused, naming what was found.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import BlipConfig

from blip.config import ConfigError
from blip.config.schema import ModelConfig
from blip.data.tokenizer import load_tokenizer
from blip.data.transforms import CLIP_MEAN, CLIP_STD
from blip.models.checkpoint import read_state_dict
from blip.models.export_hf import HF_CLASSES, rename_vision

ARCHITECTURES = {model_class.__name__: task for task, (model_class, _) in HF_CLASSES.items()}
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # each may be sharded (<name>.index.json)
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")  # transformers 4 / 5
DECODER_BIAS = "text_decoder.cls.predictions.decoder.bias"  # the port's second name for predictions.bias
PRESETS = {(768, 12): "base", (1024, 24): "large"}  # (vision width, depth) -> the label of our presets


class NotBlipFolderError(ConfigError):
    """A folder that is not a transformers BLIP model this project can load."""


@dataclass(frozen=True)
class HFFolder:
    path: Path
    architecture: str  # e.g. "BlipForConditionalGeneration"
    model: ModelConfig
    tokenizer: str | None  # the folder when it holds tokenizer files


def is_transformers_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def is_blip_folder(path: Path) -> bool:
    return is_transformers_folder(path) and _json(path / "config.json").get("model_type") == "blip"


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise NotBlipFolderError(f"{path}: cannot read: {exc}") from exc
    if not isinstance(data, dict):
        raise NotBlipFolderError(f"{path}: expected a JSON object")
    return data


def read_folder(path: Path, base: ModelConfig | None = None) -> HFFolder:
    """The folder's architecture, model config and tokenizer. Training-only settings a transformers config does
    not describe (dropout, drop-path, gradient checkpointing) come from `base`."""
    raw = _json(path / "config.json")
    architecture = (raw.get("architectures") or ["(no architectures entry)"])[0]
    if raw.get("model_type") != "blip" or architecture not in ARCHITECTURES:
        hint = " (the port's CLIP-style model, not a BLIP checkpoint)" if architecture == "BlipModel" else ""
        raise NotBlipFolderError(
            f"{path}: holds a {architecture} (model_type {raw.get('model_type')!r}){hint}; transformers folders "
            f"of {', '.join(ARCHITECTURES)} can be loaded"
        )
    config = BlipConfig.from_dict(raw)  # transformers' own defaults for what the file leaves out
    model = model_config(config, architecture, base or ModelConfig(), _image_size(path), path)
    has_tokenizer = any((path / name).is_file() for name in TOKENIZER_FILES)
    if has_tokenizer:
        _check_tokenizer(path, config)
    return HFFolder(path, architecture, model, str(path) if has_tokenizer else None)


def model_config(
    config: BlipConfig, architecture: str, base: ModelConfig, image_size: int | None, path: Path
) -> ModelConfig:
    """Our ModelConfig for a transformers BlipConfig (the inverse of `export_hf.hf_config`)."""
    vision, text = config.vision_config, config.text_config
    problems = [f"{side} hidden_act {c.hidden_act!r} (BLIP: gelu)" for side, c in (("vision", vision), ("text", text))
                if c.hidden_act != "gelu"]  # fmt: skip
    if vision.intermediate_size != 4 * vision.hidden_size:
        problems.append(f"vision intermediate_size {vision.intermediate_size} (BLIP's ViT: 4 x hidden_size)")
    if text.encoder_hidden_size != vision.hidden_size:
        problems.append(f"text encoder_hidden_size {text.encoder_hidden_size} != vision hidden_size")
    if architecture == "BlipForQuestionAnswering" and text.hidden_size != vision.hidden_size:
        # The port's answer decoder attends to the question states with key/value of the vision width: it cannot
        # run on them; BLIP's uses the text width.
        width, question = vision.hidden_size, text.hidden_size
        problems.append(f"an answer decoder of the vision width {width} for questions {question} wide")
    if problems:
        raise NotBlipFolderError(f"{path}: not BLIP's architecture: {'; '.join(problems)}")
    return ModelConfig(
        preset=PRESETS.get((vision.hidden_size, vision.num_hidden_layers), "custom"),
        image_size=image_size or vision.image_size,
        patch_size=vision.patch_size,
        vision_width=vision.hidden_size,
        vision_depth=vision.num_hidden_layers,
        vision_heads=vision.num_attention_heads,
        vision_layer_norm_eps=vision.layer_norm_eps,
        text_width=text.hidden_size,
        text_depth=text.num_hidden_layers,
        text_heads=text.num_attention_heads,
        text_intermediate=text.intermediate_size,
        text_layer_norm_eps=text.layer_norm_eps,
        max_text_positions=text.max_position_embeddings,
        vocab_size=text.vocab_size,
        embed_dim=config.image_text_hidden_size,
        text_dropout=base.text_dropout,
        drop_path=base.drop_path,
        grad_ckpt_layers=base.grad_ckpt_layers,
    )


def _image_size(path: Path) -> int | None:
    """The processor's square resize, which is what the folder's users feed it (the model may have been trained
    at another size than its config's); None when the folder has no image processor."""
    found = next((path / name for name in PROCESSOR_FILES if (path / name).is_file()), None)
    if found is None:
        return None
    processor = _json(found)
    processor = processor.get("image_processor", processor)  # transformers 5 nests it in processor_config.json
    for key, ours in (("image_mean", CLIP_MEAN), ("image_std", CLIP_STD)):
        theirs = processor.get(key)
        if theirs is not None and any(abs(a - b) > 1e-6 for a, b in zip(theirs, ours, strict=True)):
            raise NotBlipFolderError(f"{found}: {key} {theirs}; BLIP (and this project) normalise with {list(ours)}")
    size = processor.get("size")
    if isinstance(size, int):
        return size
    if isinstance(size, dict) and size.get("height") == size.get("width") and size.get("height"):
        return int(size["height"])
    raise NotBlipFolderError(f"{found}: size {size!r}: expected a square resize (BLIP's images are square)")


def _check_tokenizer(path: Path, config: BlipConfig) -> None:
    tokenizer = load_tokenizer(str(path))
    text = config.text_config
    ours = (len(tokenizer), tokenizer.bos_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id)
    if ours != (text.vocab_size, text.bos_token_id, text.sep_token_id, text.pad_token_id):
        raise NotBlipFolderError(
            f"{path}: the tokenizer (size, [DEC], [SEP], [PAD] = {ours}) does not match config.json "
            f"({text.vocab_size}, {text.bos_token_id}, {text.sep_token_id}, {text.pad_token_id})"
        )


def _weight_files(path: Path) -> list[Path]:
    for name in WEIGHT_FILES:
        index = path / f"{name}.index.json"
        if index.is_file():  # sharded: the index maps each key to its file
            return [path / f for f in sorted(set(_json(index).get("weight_map", {}).values()))]
        if (path / name).is_file():
            return [path / name]
    raise NotBlipFolderError(f"{path}: no weights ({' or '.join(WEIGHT_FILES)}, or their .index.json)")


def read_state(path: Path) -> dict[str, torch.Tensor]:
    """The folder's weights in BLIP's official layout (safetensors, or .bin read with weights_only)."""
    state: dict[str, torch.Tensor] = {}
    for file in _weight_files(path):
        state |= read_state_dict(file)
    return from_hf_state(state, path)


def from_hf_state(state: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        if key.startswith("vision_model."):
            renamed = rename_vision(key, to_hf=False)
            if renamed is None:
                raise NotBlipFolderError(f"{path}: vision key {key} has no BLIP name (not BLIP's ViT?)")
            out[renamed] = value
        elif key != DECODER_BIAS and not key.endswith(".position_ids"):  # a duplicate; a non-weight buffer
            out[key] = value
    if DECODER_BIAS in state:
        out.setdefault("text_decoder.cls.predictions.bias", state[DECODER_BIAS])
    return out
