"""Building a model for a task from the validated config, with optional ViT / BERT starting weights.

A small registry, as in timm: task name -> class. `model.vit_init` (timm name or file) initialises the image
encoder; `model.bert_init` (a BERT folder or hub name) the text side: embeddings, self-attention and FFN load,
cross-attention starts fresh, since BERT has none (its key/value width is the vision width).
"""

from __future__ import annotations

from pathlib import Path

from torch import nn
from transformers import BertModel, PreTrainedTokenizer

from blip.config import ConfigError
from blip.config.schema import ModelConfig
from blip.data.tokenizer import SpecialTokens, load_tokenizer
from blip.models.caption import PROMPT, BlipCaptioner
from blip.models.checkpoint import load_official, read_state_dict, stored_config
from blip.models.contrastive import copy_to_momentum
from blip.models.med import MED
from blip.models.nlvr import BlipNLVR, NlvrEncoder
from blip.models.pretrain import BlipPretrain
from blip.models.retrieval import BlipRetrieval
from blip.models.vit import load_vit_weights
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
        load_vit_weights(model.visual_encoder, cfg.vit_init)
    if cfg.bert_init:
        bert = read_bert(cfg.bert_init)
        for name, module in model.named_modules():
            if isinstance(module, MED | NlvrEncoder) and not name.split(".")[0].endswith("_m"):
                load_bert_weights(module, bert, cfg.bert_init)
    if hasattr(model, "momentum_pairs"):
        copy_to_momentum(model.momentum_pairs)
    model.model_config = cfg  # the resolved config (vocab size included), saved with the weights
    return model


def read_bert(source: str) -> BertModel:
    try:
        return BertModel.from_pretrained(source, add_pooling_layer=False)
    except OSError as exc:
        raise OSError(f"model.bert_init={source!r}: not a BERT folder or cached hub model ({exc})") from exc


def load_bert_weights(med: MED | NlvrEncoder, bert: BertModel, source: str) -> None:
    """BERT's embeddings, self-attention and FFN into a MED; token-type embeddings and pooler are not used."""
    if bert.config.hidden_size != med.config.hidden_size or bert.config.num_hidden_layers < len(med.encoder.layer):
        raise ValueError(
            f"model.bert_init={source!r}: BERT is {bert.config.num_hidden_layers} x {bert.config.hidden_size}, "
            f"the text side is {len(med.encoder.layer)} x {med.config.hidden_size} (set text_width/text_depth)"
        )
    own = med.state_dict()
    loaded = {}
    for key, value in bert.state_dict().items():
        if key not in own:
            continue  # token_type_embeddings, position_ids, deeper layers than ours
        if key == "embeddings.word_embeddings.weight":  # BERT's 30,522 rows; [DEC] and [ENC] keep their init
            merged = own[key].clone()
            merged[: value.shape[0]] = value
            value = merged
        elif key == "embeddings.position_embeddings.weight":
            value = value[: own[key].shape[0]]
        loaded[key] = value
    med.load_state_dict(loaded, strict=False)


def load_trained(
    task: str, weights: Path, cfg: ModelConfig | None, tokenizer_name: str | None, tokenizer: str | None = None
) -> tuple[nn.Module, PreTrainedTokenizer]:
    """A `task` model holding a weights file: our safetensors (config and tokenizer inside) or an official-layout
    file (then `cfg` and `tokenizer_name` describe it). `tokenizer` replaces the stored tokenizer name (e.g. the
    vocabulary shipped beside the weights in a registered model). Parts of other tasks in the file are dropped."""
    state = read_state_dict(weights)
    stored = stored_config(weights)
    if stored is None and (cfg is None or tokenizer_name is None):
        raise ConfigError(f"{weights} holds no model config: give the model config and tokenizer (--params)")
    cfg, tokenizer_name = stored or (cfg, tokenizer_name)
    cfg = cfg.model_copy(update={"vit_init": None, "bert_init": None})  # the file holds every weight
    text = load_tokenizer(tokenizer or tokenizer_name)
    queue = state["image_queue"].shape[1] if "image_queue" in state else 0
    model = build_model(task, cfg, text, queue_size=queue)
    load_official(model, state)
    return model, text
