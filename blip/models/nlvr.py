"""NLVR2: one statement, two images. Every layer cross-attends to each image separately (`self0`, `self1`);
the first half of the layers averages the two results, the second half concatenates them and merges with a
learned layer, as in BLIP. A two-layer MLP on the [ENC] output classifies true/false. Keys match the official
NLVR2 checkpoints; `adapt_official` initialises both cross-attentions from a pretrained one, as BLIP does.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from blip.config.schema import ModelConfig
from blip.data.tokenizer import SpecialTokens
from blip.models.med import Embeddings, Encoder, SelfAttention, bert_config, init_bert_weights, key_mask
from blip.models.vit import create_vit


class TwinOutput(nn.Module):
    def __init__(self, width: int, eps: float, dropout: float, merge: bool) -> None:
        super().__init__()
        self.dense0 = nn.Linear(width, width)
        self.dense1 = nn.Linear(width, width)
        if merge:
            self.act = ACT2FN["gelu"]
            self.merge_layer = nn.Linear(2 * width, width)
        self.LayerNorm = nn.LayerNorm(width, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, first: torch.Tensor, second: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        first, second = self.dense0(first), self.dense1(second)
        if hasattr(self, "merge_layer"):
            merged = self.merge_layer(torch.cat([first, second], dim=-1))
        else:
            merged = (first + second) / 2
        return self.LayerNorm(self.dropout(merged) + residual)


class TwinCrossAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, merge: bool) -> None:
        super().__init__()
        config = bert_config(cfg)
        self.self0 = SelfAttention(config, kv_width=cfg.vision_width)
        self.self1 = SelfAttention(config, kv_width=cfg.vision_width)
        self.output = TwinOutput(config.hidden_size, config.layer_norm_eps, config.hidden_dropout_prob, merge)

    def forward(self, x: torch.Tensor, image0: torch.Tensor, image1: torch.Tensor) -> torch.Tensor:
        first = self.self0(x, None, self.self0.project_kv(image0))
        second = self.self1(x, None, self.self1.project_kv(image1))
        return self.output(first, second, x)


class NlvrEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = bert_config(cfg)
        self.embeddings = Embeddings(self.config)
        self.encoder = Encoder(self.config, cfg.vision_width, cross_attention=False)
        for index, layer in enumerate(self.encoder.layer):
            layer.crossattention = TwinCrossAttention(cfg, merge=index >= cfg.text_depth // 2)
        self.apply(init_bert_weights)

    def forward(
        self, ids: torch.Tensor, mask: torch.Tensor, image0: torch.Tensor, image1: torch.Tensor
    ) -> torch.Tensor:
        x = self.embeddings(ids)
        self_mask = key_mask(mask)
        for index, layer in enumerate(self.encoder.layer):
            x = layer.self_attend(x, self_mask, None, index)
            x = layer.feed_forward(layer.crossattention(x, image0, image1))
        return x


class BlipNLVR(nn.Module):
    FRESH_PARAMETERS = (r"\.merge_layer\.", r"^cls_head\.")  # absent from pretrained checkpoints

    def __init__(self, cfg: ModelConfig, tokens: SpecialTokens) -> None:
        super().__init__()
        self.tokens = tokens
        self.visual_encoder = create_vit(cfg)
        self.text_encoder = NlvrEncoder(cfg)
        width = cfg.text_width
        self.cls_head = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 2))

    def logits(self, images0: torch.Tensor, images1: torch.Tensor, ids: torch.Tensor,
               mask: torch.Tensor) -> torch.Tensor:  # fmt: skip
        image_embeds = self.visual_encoder(torch.cat([images0, images1]))
        first, second = image_embeds.split(images0.shape[0])
        enc_ids = ids.clone()
        enc_ids[:, 0] = self.tokens.enc
        return self.cls_head(self.text_encoder(enc_ids, mask, first, second)[:, 0])

    def forward(self, images0: torch.Tensor, images1: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                labels: torch.Tensor) -> torch.Tensor:  # fmt: skip
        return F.cross_entropy(self.logits(images0, images1, ids, mask), labels)

    @staticmethod
    def adapt_official(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A pretrained (single cross-attention) state dict -> NLVR2 keys: `self` and `dense` copied to both twins.

        An NLVR2 checkpoint (already twin) passes through unchanged. `merge_layer` and `cls_head` start fresh.
        """
        adapted = {}
        for key, value in state.items():
            single = re.match(r"(text_encoder\.encoder\.layer\.\d+\.crossattention\.)(self|output\.dense)\.(.*)", key)
            if single:
                prefix, part, rest = single.groups()
                for twin in ("0", "1"):
                    adapted[f"{prefix}{part}{twin}.{rest}"] = value
            else:
                adapted[key] = value
        return adapted
