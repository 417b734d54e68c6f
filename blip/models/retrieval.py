"""Image-text retrieval (and CapFilt's filter): ITC with an id queue and momentum distillation, ITM on [ENC].

Captions of the same image are positives for each other (targets from image ids, including the queued ones) and
are never drawn as hard negatives. Keys match the official retrieval checkpoints (`visual_encoder`,
`text_encoder`, `vision_proj`, `text_proj`, `itm_head`, `temp`, `*_m`, `image_queue`, `text_queue`,
`idx_queue`, `ptr_queue`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from blip.config.schema import ModelConfig
from blip.data.tokenizer import SpecialTokens
from blip.models.contrastive import DualEncoder, enqueue


@dataclass
class RetrievalLosses:
    loss: torch.Tensor
    itc: torch.Tensor
    itm: torch.Tensor


class BlipRetrieval(DualEncoder):
    def __init__(self, cfg: ModelConfig, tokens: SpecialTokens, queue_size: int, momentum: float = 0.995,
                 itm_hard_share: float = 1.0) -> None:  # fmt: skip
        super().__init__(cfg, tokens, momentum, itm_hard_share)
        self.register_buffer("image_queue", F.normalize(torch.randn(cfg.embed_dim, queue_size), dim=0))
        self.register_buffer("text_queue", F.normalize(torch.randn(cfg.embed_dim, queue_size), dim=0))
        self.register_buffer("idx_queue", torch.full((1, queue_size), -100, dtype=torch.long))
        self.register_buffer("ptr_queue", torch.zeros(1, dtype=torch.long))

    def forward(
        self, images: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor, image_ids: torch.Tensor,
        alpha: float,
    ) -> RetrievalLosses:  # fmt: skip
        image_embeds, image_feat = self.image_features(images)
        text_feat = self.text_features(text_ids, text_mask)
        queues = (self.image_queue, self.text_queue)
        itc = self.itc(images, image_feat, text_feat, text_ids, text_mask, queues, alpha, image_ids, self.idx_queue)
        enqueue([*queues, self.idx_queue], self.ptr_queue, [itc.image_feat_m, itc.text_feat_m, itc.image_ids])
        itm = self.itm(image_embeds, image_feat, text_feat, text_ids, text_mask, image_ids)
        return RetrievalLosses(itc.loss + itm, itc.loss, itm)
