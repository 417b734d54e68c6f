"""MED, BLIP's multimodal mixture of encoder-decoder, on `transformers`' BERT building blocks.

Each layer: self-attention, then cross-attention to the image tokens (skipped in unimodal mode), then the FFN.
One class serves three uses:
- unimodal text encoder: `med(ids, mask)` with `[CLS]` at position 0 (ITC);
- image-grounded encoder: `med(ids, mask, image_embeds)` with `[ENC]` at position 0 (ITM, VQA, NLVR2);
- image-grounded decoder: `med(ids, mask, image_embeds, causal=True)` with `[DEC]` at position 0 (LM).
Parameter names follow BLIP's `med.py` (and the `transformers` BLIP port), so checkpoints map one to one.
Attention runs through `torch.nn.functional.scaled_dot_product_attention`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig
from transformers.models.bert.modeling_bert import (
    BertIntermediate,
    BertOutput,
    BertPredictionHeadTransform,
    BertSelfOutput,
)

from blip.config.schema import ModelConfig

LayerKV = tuple[torch.Tensor, torch.Tensor]


def bert_config(cfg: ModelConfig) -> BertConfig:
    return BertConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.text_width,
        num_hidden_layers=cfg.text_depth,
        num_attention_heads=cfg.text_heads,
        intermediate_size=cfg.text_intermediate or 4 * cfg.text_width,
        hidden_act="gelu",
        hidden_dropout_prob=cfg.text_dropout,
        attention_probs_dropout_prob=cfg.text_dropout,
        max_position_embeddings=cfg.max_text_positions,
        layer_norm_eps=cfg.text_layer_norm_eps,
        pad_token_id=0,
    )


def causal_mask(past: int | torch.Tensor, length: int, keys: int, device: torch.device) -> torch.Tensor:
    """[length, keys] bool: new position i (at `past + i`) sees the key slots up to its own."""
    rows = (past + torch.arange(length, device=device))[:, None]
    return torch.arange(keys, device=device)[None, :] <= rows


@dataclass
class KVCache:
    """Keys/values of past decoder positions (self-attention) and of the image tokens (cross-attention)."""

    self_kv: list[LayerKV | None] = field(default_factory=list)
    cross_kv: list[LayerKV | None] = field(default_factory=list)

    def length(self) -> int | torch.Tensor:
        """Positions already cached (where the new ones start)."""
        return 0 if not self.self_kv or self.self_kv[0] is None else self.self_kv[0][0].shape[2]

    def self_mask(self, length: int, device: torch.device) -> torch.Tensor | None:
        """Which keys `length` new positions may see: one new position sees every cached one (no mask)."""
        return None if length == 1 else causal_mask(self.length(), length, self.length() + length, device)

    def advance(self, length: int) -> None:
        """After a forward of `length` new positions (this cache's length is that of its tensors)."""

    def select(self, index: torch.Tensor) -> None:
        """Reorder the batch: beam search keeps the self-attention caches of the beams it continues. A beam only
        continues a beam of its own image, whose image keys/values are the same, so the cross-attention cache
        changes only when the rows do (after the prompt, which runs once per image, each beam takes its image's)."""
        for kvs in (self.self_kv, self.cross_kv):
            for i, kv in enumerate(kvs):
                if kv is not None and (kvs is self.self_kv or len(kv[0]) != len(index)):
                    kvs[i] = (kv[0].index_select(0, index), kv[1].index_select(0, index))

    def extend(self, index: int, kv: LayerKV) -> LayerKV:
        """Append the new positions' keys/values to layer `index`'s; all of them, for attention."""
        past = self.self_kv[index]
        if past is not None:
            kv = (torch.cat([past[0], kv[0]], dim=2), torch.cat([past[1], kv[1]], dim=2))
        self.self_kv[index] = kv
        return kv


class StaticKVCache(KVCache):
    """Self-attention keys/values for `capacity` positions, allocated once and written in place from `position` (a
    device tensor): every decoding step has the same shapes, allocates nothing for the cache and needs no host sync
    to know the length, so on a GPU steps queue back to back (as capturing them in a CUDA graph would also need).
    Slots not yet written are masked. For a fixed set of rows (greedy, sampling): beam search, which reorders rows,
    uses `KVCache`. Decoding steps only (no `attention_mask`: every row decodes in step)."""

    def __init__(self, capacity: int, device: torch.device) -> None:
        super().__init__()
        self.capacity = capacity
        self.position = torch.zeros((), dtype=torch.long, device=device)

    def length(self) -> torch.Tensor:
        return self.position

    def self_mask(self, length: int, device: torch.device) -> torch.Tensor:
        return causal_mask(self.position, length, self.capacity, device)  # unwritten slots hidden too

    def advance(self, length: int) -> None:
        self.position += length  # in place: the same tensor at every step

    def select(self, index: torch.Tensor) -> None:
        raise NotImplementedError("a static cache keeps its rows: beam search uses KVCache")

    def extend(self, index: int, kv: LayerKV) -> LayerKV:
        if self.self_kv[index] is None:
            shape = (*kv[0].shape[:2], self.capacity, kv[0].shape[3])
            self.self_kv[index] = (kv[0].new_zeros(shape), kv[1].new_zeros(shape))
        slots = self.position + torch.arange(kv[0].shape[2], device=self.position.device)
        keys, values = self.self_kv[index]
        keys.index_copy_(2, slots, kv[0])
        values.index_copy_(2, slots, kv[1])
        return keys, values


class Embeddings(nn.Module):
    """Word + absolute position embeddings, LayerNorm, dropout (BLIP has no token-type embeddings)."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor, past_length: int | torch.Tensor = 0) -> torch.Tensor:
        positions = past_length + torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)[None]
        return self.dropout(self.LayerNorm(x))


class SelfAttention(nn.Module):
    """Multi-head attention; as cross-attention its keys/values come from the image (width `kv_width`)."""

    def __init__(self, config: BertConfig, kv_width: int | None = None) -> None:
        super().__init__()
        self.heads = config.num_attention_heads
        width = config.hidden_size
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(kv_width or width, width)
        self.value = nn.Linear(kv_width or width, width)
        self.dropout_p = config.attention_probs_dropout_prob

    def split(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], self.heads, -1).transpose(1, 2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, kv: LayerKV) -> torch.Tensor:
        q = self.split(self.query(x))
        dropout = self.dropout_p if self.training else 0.0
        out = F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=mask, dropout_p=dropout)
        return out.transpose(1, 2).flatten(2)

    def project_kv(self, source: torch.Tensor) -> LayerKV:
        return self.split(self.key(source)), self.split(self.value(source))


class Attention(nn.Module):
    def __init__(self, config: BertConfig, kv_width: int | None = None) -> None:
        super().__init__()
        self.self = SelfAttention(config, kv_width)
        self.output = BertSelfOutput(config)


class Layer(nn.Module):
    def __init__(self, config: BertConfig, vision_width: int, cross_attention: bool) -> None:
        super().__init__()
        self.attention = Attention(config)
        if cross_attention:
            self.crossattention = Attention(config, kv_width=vision_width)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def self_attend(
        self, x: torch.Tensor, mask: torch.Tensor | None, cache: KVCache | None, index: int
    ) -> torch.Tensor:
        attn = self.attention.self
        kv = attn.project_kv(x)
        if cache is not None:
            kv = cache.extend(index, kv)
        return self.attention.output(attn(x, mask, kv), x)

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.intermediate(x), x)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        image_embeds: torch.Tensor | None,
        image_mask: torch.Tensor | None,
        cache: KVCache | None,
        index: int,
    ) -> torch.Tensor:
        x = self.self_attend(x, mask, cache, index)
        if image_embeds is not None:
            cross = self.crossattention.self
            kv = cache.cross_kv[index] if cache is not None else None
            if kv is None:
                kv = cross.project_kv(image_embeds)
                if cache is not None:
                    cache.cross_kv[index] = kv
            x = self.crossattention.output(cross(x, image_mask, kv), x)
        return self.feed_forward(x)


class Encoder(nn.Module):
    def __init__(self, config: BertConfig, vision_width: int, cross_attention: bool) -> None:
        super().__init__()
        layers = [Layer(config, vision_width, cross_attention) for _ in range(config.num_hidden_layers)]
        self.layer = nn.ModuleList(layers)


def key_mask(mask: torch.Tensor) -> torch.Tensor:
    """[B, Lk] of 1 (attend) / 0 (padding) -> boolean [B, 1, 1, Lk] for SDPA."""
    return mask.bool()[:, None, None, :]


def init_bert_weights(module: nn.Module) -> None:
    """BERT's initialisation: normal(0, 0.02) weights, zero biases, unit LayerNorm."""
    if isinstance(module, nn.Linear | nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
    if isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class MED(nn.Module):
    """BERT-style text transformer with optional cross-attention in every layer, to image tokens (of the vision
    width) unless `context_width` says otherwise."""

    def __init__(self, cfg: ModelConfig, cross_attention: bool = True, context_width: int | None = None) -> None:
        super().__init__()
        self.config = bert_config(cfg)
        self.embeddings = Embeddings(self.config)
        self.encoder = Encoder(self.config, context_width or cfg.vision_width, cross_attention)
        self.apply(init_bert_weights)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        image_embeds: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
        causal: bool = False,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """`attention_mask` covers past (cached) and current positions, None when all are valid (decoding); returns
        the new positions' states."""
        layers = self.encoder.layer
        if cache is not None and not cache.self_kv:
            cache.self_kv = [None] * len(layers)
            cache.cross_kv = [None] * len(layers)
        past = cache.length() if cache is not None else 0
        length = input_ids.shape[1]
        mask = None if attention_mask is None else key_mask(attention_mask)
        if cache is not None:  # decoding (causal): the cache knows which of its slots each new position sees
            seen = cache.self_mask(length, input_ids.device)
        else:
            seen = causal_mask(0, length, length, input_ids.device) if causal and length > 1 else None
        if seen is not None:
            mask = seen if mask is None else mask & seen
        # No image mask (every image token valid) lets SDPA pick its fastest kernel.
        image_mask_4d = None if image_mask is None else key_mask(image_mask)
        x = self.embeddings(input_ids, past)
        for index, layer in enumerate(layers):
            x = layer(x, mask, image_embeds, image_mask_4d, cache, index)
        if cache is not None:
            cache.advance(length)
        return x


class LMHead(nn.Module):
    """BERT's prediction head (`cls.predictions`); the decoder weight is tied to the word embeddings."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.predictions = nn.Module()
        self.predictions.transform = BertPredictionHeadTransform(config)
        self.predictions.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.predictions.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        head = self.predictions
        # The bias inside the matmul (addmm): adding it afterwards costs one more pass over [B, L, vocab].
        return F.linear(head.transform(hidden), head.decoder.weight, head.bias)


def lm_loss(
    logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float, reduction: str = "mean"
) -> torch.Tensor:
    """Cross-entropy of `logits` [B, T, V] against `targets` [B, T] (the next tokens; -100 ignored).

    'mean' averages over the targeted tokens; 'none' gives each sequence's summed loss.
    """
    loss = F.cross_entropy(
        logits.flatten(0, 1), targets.flatten(), ignore_index=-100, label_smoothing=label_smoothing,
        reduction="none" if reduction == "none" else "mean",
    )  # fmt: skip
    return loss.view(targets.shape[0], -1).sum(1) if reduction == "none" else loss


class TextDecoder(nn.Module):
    """The image-grounded decoder: `bert` (a MED run causally) + `cls` (LM head tied to its embeddings)."""

    def __init__(self, cfg: ModelConfig, context_width: int | None = None) -> None:
        super().__init__()
        self.bert = MED(cfg, context_width=context_width)
        self.cls = LMHead(self.bert.config)
        self.cls.apply(init_bert_weights)
        self.tie_lm_head()

    def tie_lm_head(self) -> None:
        self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_embeds: torch.Tensor,
        image_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Next-token logits at every position [B, L, vocab]."""
        return self.cls(self.bert(input_ids, attention_mask, image_embeds, image_mask, causal=True))

    def next_token_logits(
        self, input_ids: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None, cache: KVCache
    ) -> torch.Tensor:
        """Decoding: run the new positions (no padding: every sequence decodes in step) through the cached decoder;
        logits [B, vocab] after the last one only (the vocabulary head on the prompt's other positions would be
        wasted)."""
        return self.cls(self.bert(input_ids, None, context, context_mask, causal=True, cache=cache)[:, -1])

    def loss(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        context: torch.Tensor,
        labels: torch.Tensor,
        label_smoothing: float,
        context_mask: torch.Tensor | None = None,
        first: int = 0,
        reduction: str = "mean",
    ) -> torch.Tensor:
        """LM loss: position t predicts `labels[:, t + 1]` (-100 ignored), for t >= `first`.

        The vocabulary projection is the decoder's largest matmul at small widths, so it runs only where a target
        can be: not on the last position, nor before `first` (a prompt whose tokens are never targets).
        """
        hidden = self.bert(input_ids, attention_mask, context, context_mask, causal=True)
        return lm_loss(self.cls(hidden[:, first:-1]), labels[:, first + 1 :], label_smoothing, reduction)


def share_except_self_attention(encoder: MED, decoder: MED) -> None:
    """Tie the decoder to the encoder as BLIP does: embeddings, cross-attention and FFN are shared; each keeps
    its own self-attention (query/key/value and its output dense + LayerNorm)."""
    decoder.embeddings = encoder.embeddings
    for enc_layer, dec_layer in zip(encoder.encoder.layer, decoder.encoder.layer, strict=True):
        dec_layer.crossattention = enc_layer.crossattention
        dec_layer.intermediate = enc_layer.intermediate
        dec_layer.output = enc_layer.output
