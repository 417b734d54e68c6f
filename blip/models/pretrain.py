"""BLIP pretraining: ITC (momentum distillation + queues), ITM (hard negatives) and LM, with equal weights.

Parameter and buffer names follow the official `BLIP_Pretrain` (`visual_encoder`, `text_encoder`,
`text_decoder`, `vision_proj`, `text_proj`, `itm_head`, `temp`, the `*_m` momentum copies, `image_queue`,
`text_queue`, `queue_ptr`), so official pretraining checkpoints load key for key.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from blip.config.schema import ModelConfig
from blip.data.tokenizer import SpecialTokens
from blip.models.contrastive import DualEncoder, enqueue
from blip.models.med import TextDecoder, share_except_self_attention


@dataclass
class PretrainLosses:
    loss: torch.Tensor
    itc: torch.Tensor
    itm: torch.Tensor
    lm: torch.Tensor
    itc_accuracy: torch.Tensor  # image->text top-1 among the global batch and queue, for monitoring


class BlipPretrain(DualEncoder):
    def __init__(
        self,
        cfg: ModelConfig,
        tokens: SpecialTokens,
        queue_size: int,
        momentum: float = 0.995,
        label_smoothing: float = 0.1,
        itm_hard_share: float = 1.0,
    ) -> None:
        super().__init__(cfg, tokens, momentum, itm_hard_share)
        self.label_smoothing = label_smoothing
        self.text_decoder = TextDecoder(cfg)
        share_except_self_attention(self.text_encoder, self.text_decoder.bert)
        self.text_decoder.tie_lm_head()
        self.register_buffer("image_queue", F.normalize(torch.randn(cfg.embed_dim, queue_size), dim=0))
        self.register_buffer("text_queue", F.normalize(torch.randn(cfg.embed_dim, queue_size), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    def forward(
        self,
        images: torch.Tensor,
        text_ids: torch.Tensor,
        text_mask: torch.Tensor,
        alpha: float,
        image_ids: torch.Tensor | None = None,
    ) -> PretrainLosses:
        """`text_ids` start with [CLS] (as tokenised); [ENC] and [DEC] replace it for ITM and LM.

        ITC positives are the diagonal (as in BLIP); known image ids keep same-image captions out of ITM negatives.
        """
        image_embeds, image_feat = self.image_features(images)
        text_feat = self.text_features(text_ids, text_mask)
        queues = (self.image_queue, self.text_queue)
        itc = self.itc(images, image_feat, text_feat, text_ids, text_mask, queues, alpha)
        enqueue(list(queues), self.queue_ptr, [itc.image_feat_m, itc.text_feat_m])
        itm = self.itm(image_embeds, image_feat, text_feat, text_ids, text_mask, image_ids)

        # LM: [DEC] + caption, predicting each next token; padding ignored
        dec_ids = text_ids.clone()
        dec_ids[:, 0] = self.tokens.bos
        labels = dec_ids.masked_fill(dec_ids == self.tokens.pad, -100)
        lm = self.text_decoder.loss(dec_ids, text_mask, image_embeds, labels, self.label_smoothing)

        return PretrainLosses(itc.loss + itm + lm, itc.loss, itm, lm, itc.accuracy)
