"""Building a model for a task from the validated config, with optional ViT / BERT starting weights, and
reading any weights source: our safetensors, an official BLIP file, a transformers BLIP folder.

A small registry, as in timm: task name -> class. `model.vit_init` (timm name, weights file or transformers BLIP
folder) initialises the image encoder; `model.bert_init` (a BERT folder or hub name, or a transformers BLIP
folder) the text side: embeddings, self-attention and FFN load; cross-attention starts fresh from BERT, which has
none, and loads from a BLIP folder.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import BertModel, PreTrainedTokenizer

from blip.config import ConfigError
from blip.config.schema import ModelConfig
from blip.data.tokenizer import SpecialTokens, load_tokenizer
from blip.models.caption import PROMPT, BlipCaptioner
from blip.models.checkpoint import read_file, read_state_dict
from blip.models.import_hf import is_blip_folder, is_transformers_folder, read_folder, read_state
from blip.models.med import MED
from blip.models.nlvr import BlipNLVR, NlvrEncoder
from blip.models.pretrain import BlipPretrain
from blip.models.retrieval import BlipRetrieval
from blip.models.vit import load_vit_state, resize_pos_embed, timm_state
from blip.models.vqa import BlipVQA

POS_EMBED_KEYS = ("visual_encoder.pos_embed", "visual_encoder_m.pos_embed")
TASKS = ("pretrain", "retrieval", "caption", "vqa", "nlvr")


def build_model(
    task: str,
    cfg: ModelConfig,
    tokenizer: PreTrainedTokenizer,
    queue_size: int = 57600,
    momentum: float = 0.995,
    label_smoothing: float = 0.1,
    itm_hard_share: float = 1.0,
) -> nn.Module:
    if cfg.vocab_size is None:
        cfg = cfg.model_copy(update={"vocab_size": len(tokenizer)})
    elif len(tokenizer) != cfg.vocab_size:
        raise ValueError(f"model.vocab_size {cfg.vocab_size} != tokenizer size {len(tokenizer)} ([DEC], [ENC] added)")
    tokens = SpecialTokens.of(tokenizer)
    if task == "pretrain":
        model: nn.Module = BlipPretrain(cfg, tokens, queue_size, momentum, label_smoothing, itm_hard_share)
    elif task == "retrieval":
        model = BlipRetrieval(cfg, tokens, queue_size, momentum, itm_hard_share)
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
    if hasattr(model, "sync_momentum"):
        model.sync_momentum()
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


@dataclass
class LoadReport:
    dropped: list[str] = field(default_factory=list)  # in the file, not in this model (other parts)
    initialised: list[str] = field(default_factory=list)  # not in the file, left as built (momentum copies, queues)
    resized: list[str] = field(default_factory=list)  # position embeddings interpolated


def _component(key: str) -> str:
    return key.split(".")[0]


def load_official(model: nn.Module, state: dict[str, torch.Tensor]) -> LoadReport:
    """Load an official-layout state dict by name; see the module docstring for what is dropped or refused."""
    own = model.state_dict()
    report = LoadReport()
    adapt = getattr(model, "adapt_official", None)  # e.g. NLVR2: one pretrained cross-attention -> two
    state = adapt(state) if adapt else dict(state)
    for key in POS_EMBED_KEYS:
        if key in state and key in own and state[key].shape != own[key].shape:
            state[key] = resize_pos_embed(state[key], own[key].shape[1] - 1)
            report.resized.append(key)
    own_components = {_component(k) for k in own}
    unexpected = [k for k in state if k not in own and _component(k) in own_components]
    if unexpected:
        raise KeyError(f"keys of this model's parts that it does not have (another architecture?): {unexpected[:5]}")
    report.dropped = sorted(k for k in state if _component(k) not in own_components)
    for key, value in state.items():
        if key in own and value.shape != own[key].shape:
            raise ValueError(f"{key}: shape {tuple(value.shape)} in the file, {tuple(own[key].shape)} in the model")
    # A tied weight (the LM head, the decoder's shared layers) is satisfied by any one of its names.
    tensors = model.state_dict(keep_vars=True)
    loaded = {id(t) for k, t in tensors.items() if k in state}
    missing = [k for k, t in tensors.items() if k not in state and id(t) not in loaded]
    # Momentum copies are rebuilt from the online weights and queues start fresh when a file lacks them (a
    # fine-tuned file), as do the task heads a model declares in FRESH_PARAMETERS (a pretrained file).
    fresh = re.compile("|".join(getattr(model, "FRESH_PARAMETERS", ())) or "$^")  # task heads a file may lack
    optional = [k for k in missing if _component(k).endswith("_m") or "queue" in k or k == "temp" or fresh.search(k)]
    required = [k for k in missing if k not in optional]
    if required:
        raise KeyError(f"the file lacks {len(required)} of this model's weights, e.g. {required[:5]}")
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    report.initialised = optional
    if any(_component(k).endswith("_m") for k in optional) and hasattr(model, "sync_momentum"):
        model.sync_momentum()
    return report


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
    file = read_file(path)
    return Weights(file.state, file.config, file.tokenizer, "blip" if file.config else "official layout")


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
    if source.model is None and cfg is not None:  # an official-layout file: its keys say which patch layer it has
        conv = any(key.startswith("visual_encoder.patch_embed.backbone.") for key in source.state)
        cfg = cfg.model_copy(update={"patch_embed": "conv" if conv else "linear"})
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
