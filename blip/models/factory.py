"""Building a model for a task from the validated config, with optional ViT / BERT starting weights, and
reading any weights source: our safetensors, an official BLIP file, a transformers BLIP folder.

A small registry, as in timm: task name -> class. `model.vit_init` (timm name, weights file or transformers BLIP
folder) initialises the image encoder; `model.bert_init` (a BERT folder or hub name, or a transformers BLIP
folder) the text side: embeddings, self-attention and FFN load; cross-attention starts fresh from BERT, which has
none, and loads from a BLIP folder.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import BertModel, PreTrainedTokenizer

from blip.config import ConfigError
from blip.config.schema import ModelConfig
from blip.data.tokenizer import SpecialTokens, load_tokenizer
from blip.models.caption import PROMPT, BlipCaptioner
from blip.models.checkpoint import LoadReport, load_official, read_state_dict, stored_config
from blip.models.contrastive import copy_to_momentum
from blip.models.import_hf import is_blip_folder, is_transformers_folder, read_folder, read_state
from blip.models.med import MED
from blip.models.nlvr import BlipNLVR, NlvrEncoder
from blip.models.pretrain import BlipPretrain
from blip.models.retrieval import BlipRetrieval
from blip.models.vit import load_vit_state, timm_state
from blip.models.vqa import BlipVQA

TASKS = ("pretrain", "retrieval", "caption", "vqa", "nlvr")


def build_model(
    task: str,
    cfg: ModelConfig,
    tokenizer: PreTrainedTokenizer,
    queue_size: int = 57600,
    momentum: float = 0.995,
    label_smoothing: float = 0.1,
) -> nn.Module:
    if cfg.vocab_size is None:
        cfg = cfg.model_copy(update={"vocab_size": len(tokenizer)})
    elif len(tokenizer) != cfg.vocab_size:
        raise ValueError(f"model.vocab_size {cfg.vocab_size} != tokenizer size {len(tokenizer)} ([DEC], [ENC] added)")
    tokens = SpecialTokens.of(tokenizer)
    if task == "pretrain":
        model: nn.Module = BlipPretrain(cfg, tokens, queue_size, momentum, label_smoothing)
    elif task == "retrieval":
        model = BlipRetrieval(cfg, tokens, queue_size, momentum)
    elif task == "caption":
        model = BlipCaptioner(cfg, tokens, tokenizer(PROMPT.strip(), add_special_tokens=False).input_ids,
                              label_smoothing)  # fmt: skip
    elif task == "vqa":
        model = BlipVQA(cfg, tokens, label_smoothing)
    elif task == "nlvr":
        model = BlipNLVR(cfg, tokens)
    else:
        raise ValueError(f"unknown task {task!r}; choose from {TASKS}")
    if cfg.vit_init:
        load_vit_state(model.visual_encoder, vit_init_state(cfg.vit_init), cfg.vit_init)
    if cfg.bert_init:
        towers, done = text_init_states(cfg.bert_init), set()
        for name, module in model.named_modules():
            if isinstance(module, MED | NlvrEncoder) and not name.split(".")[0].endswith("_m"):
                # A BLIP folder's same-named tower (encoder, decoder) when it has one, else the one it has; what
                # the decoder shares with the encoder (pretraining) keeps the encoder's, loaded first.
                fresh = load_text_state(module, towers.get(name) or next(iter(towers.values())), cfg.bert_init, done)
                if fresh:
                    print(f"model.bert_init={cfg.bert_init}: {name}: {len(fresh)} tensors fresh ({', '.join(fresh[:3])}"
                          f"{', ...' if len(fresh) > 3 else ''})")  # fmt: skip
    if hasattr(model, "momentum_pairs"):
        copy_to_momentum(model.momentum_pairs)
    model.model_config = cfg  # the resolved config (vocab size included), saved with the weights
    return model


def vit_init_state(source: str) -> dict[str, torch.Tensor]:
    path = Path(source)
    if is_transformers_folder(path):
        return read_state(path)
    return read_state_dict(path) if path.is_file() else timm_state(source)


def text_init_states(source: str) -> dict[str, dict[str, torch.Tensor]]:
    """The text towers `source` offers, by our module name, each keyed as inside a MED (`embeddings.*`, ...)."""
    if not is_blip_folder(Path(source)):
        try:
            return {"": BertModel.from_pretrained(source, add_pooling_layer=False).state_dict()}
        except OSError as exc:
            raise OSError(f"model.bert_init={source!r}: not a BERT folder or cached hub model ({exc})") from exc
    state = read_state(Path(source))
    towers = {}
    for prefix in ("text_encoder.", "text_decoder.bert."):
        tower = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
        if tower:
            towers[prefix.removesuffix(".")] = tower
    return towers


def load_text_state(med: MED | NlvrEncoder, state: dict[str, torch.Tensor], source: str, done: set[int]) -> list[str]:
    """A text tower's embeddings, self-attention and FFN (and cross-attention, when it has one of our vision
    width) into a MED, except tensors in `done` (ids, updated); token-type embeddings, pooler and deeper layers
    than ours are not used. Returns the MED's tensors left as built."""
    layers = {int(k.split(".")[2]) for k in state if k.startswith("encoder.layer.")}
    width = state["embeddings.word_embeddings.weight"].shape[1]
    if width != med.config.hidden_size or len(layers) < len(med.encoder.layer):
        raise ValueError(
            f"model.bert_init={source!r}: BERT is {len(layers)} x {width}, "
            f"the text side is {len(med.encoder.layer)} x {med.config.hidden_size} (set text_width/text_depth)"
        )
    own = med.state_dict(keep_vars=True)
    loaded = {}
    for key, value in state.items():
        if key not in own or id(own[key]) in done:
            continue
        if key == "embeddings.word_embeddings.weight":  # BERT's 30,522 rows; [DEC] and [ENC] keep their init
            if value.shape[0] > own[key].shape[0]:
                raise ValueError(f"model.bert_init={source!r}: {value.shape[0]} tokens, the tokenizer has "
                                 f"{own[key].shape[0]}: use the tokenizer the text tower was trained with")  # fmt: skip
            value = torch.cat([value, own[key].detach()[value.shape[0] :]])
        elif key == "embeddings.position_embeddings.weight":
            value = value[: own[key].shape[0]]
        if value.shape == own[key].shape:  # cross-attention of another vision width stays fresh
            loaded[key] = value
            done.add(id(own[key]))
    med.load_state_dict(loaded, strict=False)
    return [key for key, tensor in own.items() if id(tensor) not in done]


@dataclass(frozen=True)
class Weights:
    """A weights source as read: the state dict in BLIP's official layout and what the source says of itself."""

    state: dict[str, torch.Tensor]
    model: ModelConfig | None  # our safetensors and transformers folders carry it; official files do not
    tokenizer: str | None
    origin: str


def read_weights(path: Path, base: ModelConfig | None = None) -> Weights:
    """Our safetensors, an official-layout file (.pth / .bin / .safetensors) or a transformers BLIP folder (its
    training-only settings from `base`)."""
    if is_transformers_folder(path):
        folder = read_folder(path, base)
        return Weights(read_state(path), folder.model, folder.tokenizer, f"transformers {folder.architecture}")
    if path.is_dir():
        raise ConfigError(f"{path}: a folder without config.json; weights are a file (.safetensors, .pth, .bin) "
                          "or a transformers BLIP folder (save_pretrained)")  # fmt: skip
    stored = stored_config(path) if path.is_file() else None
    state = read_state_dict(path)
    return Weights(state, *stored, "blip") if stored else Weights(state, None, None, "official layout")


def describe(source: Path, weights: Weights, report: LoadReport) -> str:
    """One line on what a load took: the source, and what stayed fresh, was dropped or resized."""
    parts = [f"fresh: {', '.join(report.initialised) or 'nothing'}"]
    if report.dropped:
        parts.append(f"dropped {len(report.dropped)} tensors of other parts ({report.dropped[0]}, ...)")
    if report.resized:
        parts.append(f"resized {', '.join(report.resized)}")
    return f"loaded {source} ({weights.origin}); " + "; ".join(parts)


def load_trained(
    task: str, weights: Path, cfg: ModelConfig | None, tokenizer_name: str | None, tokenizer: str | None = None
) -> tuple[nn.Module, PreTrainedTokenizer]:
    """A `task` model holding the weights of `weights`: our safetensors or a transformers BLIP folder (config and
    tokenizer inside) or an official-layout file (then `cfg` and `tokenizer_name` describe it). `tokenizer`
    replaces the stored tokenizer name (e.g. the vocabulary shipped beside the weights in a registered model).
    Parts of other tasks in the file are dropped."""
    source = read_weights(weights, cfg)
    cfg = source.model or cfg
    tokenizer = tokenizer or source.tokenizer or tokenizer_name
    if cfg is None or tokenizer is None:
        raise ConfigError(f"{weights} holds no model config: give the model config and tokenizer (--params)")
    cfg = cfg.model_copy(update={"vit_init": None, "bert_init": None})  # the file holds every weight
    text = load_tokenizer(tokenizer)
    queue = source.state["image_queue"].shape[1] if "image_queue" in source.state else 0
    model = build_model(task, cfg, text, queue_size=queue)
    report = load_official(model, source.state)
    if source.origin != "blip":  # our own files need no account; imported ones do
        print(describe(weights, source, report), file=sys.stderr)
    return model, text
