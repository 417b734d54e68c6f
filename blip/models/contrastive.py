"""ITC and ITM machinery shared by pretraining, retrieval and the CapFilt filter.

- momentum encoders (EMA copies) and feature queues, with the queue filled one global batch at a time;
- ITC targets with momentum distillation: alpha * softmax(momentum similarities) + (1 - alpha) * positives;
- ITM hard negatives drawn from softmax(similarity) + 1e-4 with positives zeroed, across ranks, through a
  gather that keeps gradients (so a negative drawn from another rank still trains that rank's encoders); with
  `hard_share` < 1 that share of the draws is hard, the rest uniform over the batch's other pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from blip.config.schema import ModelConfig
from blip.data.tokenizer import SpecialTokens
from blip.distributed import gather_no_grad, gather_padded, gather_with_grad, rank_offset
from blip.models.med import MED
from blip.models.vit import create_vit


def momentum_pairs(model: nn.Module, names: list[str]) -> list[tuple[nn.Module, nn.Module]]:
    return [(getattr(model, name), getattr(model, f"{name}_m")) for name in names]


@torch.no_grad()
def copy_to_momentum(pairs: list[tuple[nn.Module, nn.Module]]) -> None:
    for online, momentum in pairs:
        for p, p_m in zip(online.parameters(), momentum.parameters(), strict=True):
            p_m.copy_(p)
            p_m.requires_grad_(False)


@torch.no_grad()
def momentum_update(pairs: list[tuple[nn.Module, nn.Module]], momentum: float) -> None:
    # ema + (1 - m) * (online - ema) = m * ema + (1 - m) * online, as one pass over memory instead of two.
    for online, ema in pairs:
        torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in online.parameters()], 1 - momentum)


@torch.no_grad()
def enqueue(queues: list[torch.Tensor], pointer: torch.Tensor, gathered: list[torch.Tensor]) -> None:
    """Write this step's features, gathered over all ranks, as columns of the queues, FIFO."""
    if queues[0].shape[1] == 0:
        return  # no queue: negatives come from the global batch only
    size, length = gathered[0].shape[0], queues[0].shape[1]
    if length % size:
        raise ValueError(f"queue size {length} is not a multiple of the global batch {size}")
    # The columns are computed on the device: reading the pointer on the host (int(pointer)) would wait for the
    # GPU every step and break a torch.compile graph in two.
    columns = pointer + torch.arange(size, device=pointer.device)
    for queue, feats in zip(queues, gathered, strict=True):
        rows = feats.T if feats.dim() == 2 else feats[None]
        queue.index_copy_(1, columns, rows.to(queue.dtype))  # features may come in bf16 from autocast
    pointer.add_(size).remainder_(length)


def ramped_alpha(alpha: float, step: int, steps_per_epoch: int, ramp_epochs: float) -> float:
    """BLIP's distillation weight: linear from 0 to `alpha` over the first `ramp_epochs` (2 pretrain, 1 fine-tune)."""
    if ramp_epochs <= 0:
        return alpha
    return alpha * min(1.0, step / (ramp_epochs * steps_per_epoch))


def itc_loss(sim: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -(F.log_softmax(sim, dim=1) * targets).sum(1).mean()


@torch.no_grad()
def distilled_targets(sim_m: torch.Tensor, positives: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha * softmax(momentum similarities) + (1 - alpha) * positives normalised per row."""
    hard = positives / positives.sum(1, keepdim=True)
    return alpha * F.softmax(sim_m, dim=1) + (1 - alpha) * hard


@torch.no_grad()
def negative_weights(sim: torch.Tensor, positives: torch.Tensor, hard_share: float = 1.0) -> torch.Tensor:
    """Sampling weights for ITM negatives, zero on every positive: softmax(sim) + 1e-4 (BLIP's hard negatives), mixed
    with the uniform distribution so that `hard_share` of the draws are hard. A small model learns ITM from the
    easy ones first: on the hard ones alone its loss stays at the prior (see params.yaml)."""
    hard = (F.softmax(sim, dim=1) + 1e-4).masked_fill(positives, 0)
    if hard_share == 1.0:
        return hard
    uniform = (~positives).float()
    return hard_share * hard / hard.sum(1, keepdim=True) + (1 - hard_share) * uniform / uniform.sum(1, keepdim=True)


def sample_negatives(
    sim_i2t: torch.Tensor,
    sim_t2i: torch.Tensor,
    image_embeds: torch.Tensor,
    text_ids: torch.Tensor,
    text_mask: torch.Tensor,
    image_ids: torch.Tensor | None,
    generator: torch.Generator | None = None,
    hard_share: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One negative image per text and one negative text per image, drawn from the global batch.

    `sim_*` are this rank's rows against the gathered global batch ([B, world*B]). Positives are the diagonal
    and, when `image_ids` are known, every caption of the same image. Returns (negative image embeds for each
    text, negative text ids and mask for each image).
    """
    batch = image_embeds.shape[0]
    offset = rank_offset(batch)
    all_ids = gather_no_grad(image_ids) if image_ids is not None else None
    with torch.no_grad():
        positives = torch.zeros_like(sim_i2t, dtype=torch.bool)
        positives[torch.arange(batch), torch.arange(batch) + offset] = True
        if all_ids is not None:
            positives |= image_ids[:, None] == all_ids[None, :]
        weights_t2i, weights_i2t = (negative_weights(sim, positives, hard_share) for sim in (sim_t2i, sim_i2t))
        image_for_text = torch.multinomial(weights_t2i, 1, generator=generator).squeeze(1)
        text_for_image = torch.multinomial(weights_i2t, 1, generator=generator).squeeze(1)
    world_images = gather_with_grad(image_embeds)
    # Pad id 0 is [PAD] in BERT's vocabulary and in ours; mask 0 keeps padding out of attention either way.
    world_ids, world_mask = gather_padded(text_ids, pad_value=0), gather_padded(text_mask, pad_value=0)
    return world_images[image_for_text], world_ids[text_for_image], world_mask[text_for_image]


@dataclass
class ItcOutput:
    loss: torch.Tensor
    accuracy: torch.Tensor  # image->text top-1 over the global batch and queue, for monitoring
    image_feat_m: torch.Tensor  # gathered momentum features (and ids) to enqueue
    text_feat_m: torch.Tensor
    image_ids: torch.Tensor | None


class DualEncoder(nn.Module):
    """Image and text encoders with ITC projections, an ITM head on [ENC], and their momentum copies.

    Subclasses register their queues under the official names and combine `itc` and `itm` into their losses.
    """

    def __init__(self, cfg: ModelConfig, tokens: SpecialTokens, momentum: float, itm_hard_share: float = 1.0) -> None:
        super().__init__()
        self.tokens, self.momentum, self.itm_hard_share = tokens, momentum, itm_hard_share
        self.visual_encoder = create_vit(cfg)
        self.text_encoder = MED(cfg)
        self.vision_proj = nn.Linear(cfg.vision_width, cfg.embed_dim)
        self.text_proj = nn.Linear(cfg.text_width, cfg.embed_dim)
        self.itm_head = nn.Linear(cfg.text_width, 2)
        self.temp = nn.Parameter(torch.tensor(0.07))
        self.visual_encoder_m = create_vit(cfg)
        self.vision_proj_m = nn.Linear(cfg.vision_width, cfg.embed_dim)
        self.text_encoder_m = MED(cfg)
        self.text_proj_m = nn.Linear(cfg.text_width, cfg.embed_dim)
        self.momentum_pairs = momentum_pairs(self, ["visual_encoder", "vision_proj", "text_encoder", "text_proj"])
        self.sync_momentum()

    def sync_momentum(self) -> None:
        """Momentum copies := the online weights (after building, or loading weights that lack them)."""
        copy_to_momentum(self.momentum_pairs)

    def image_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(all image tokens, L2-normalised ITC feature)."""
        embeds = self.visual_encoder(images)
        return embeds, F.normalize(self.vision_proj(embeds[:, 0]), dim=-1)

    def text_features(self, text_ids: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(self.text_encoder(text_ids, text_mask)[:, 0]), dim=-1)

    def itm_logits(self, image_embeds: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """ITM logits [N, 2] (column 1 = match) for paired rows; [ENC] replaces the leading [CLS]."""
        ids = text_ids.clone()
        ids[:, 0] = self.tokens.enc
        return self.itm_head(self.text_encoder(ids, text_mask, image_embeds)[:, 0])

    @torch.inference_mode()
    def score_pairs(
        self, images: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """For each (image, text) row: ITM match probability and ITC cosine similarity."""
        embeds, image_feat = self.image_features(images)
        probability = self.itm_logits(embeds, text_ids, text_mask).softmax(-1)[:, 1]
        similarity = (image_feat * self.text_features(text_ids, text_mask)).sum(-1)
        return probability, similarity

    def itc(
        self,
        images: torch.Tensor,
        image_feat: torch.Tensor,
        text_feat: torch.Tensor,
        text_ids: torch.Tensor,
        text_mask: torch.Tensor,
        queues: tuple[torch.Tensor, torch.Tensor],
        alpha: float,
        image_ids: torch.Tensor | None = None,
        id_queue: torch.Tensor | None = None,
    ) -> ItcOutput:
        """ITC against the momentum features of the whole global batch (gathered over ranks) and the queues.

        Positives: each pair's own column, or, given `image_ids` (and the queued ids), every column of the same
        image. Gathering the current batch makes the loss the same for N ranks x B as for one process x N*B.
        """
        batch, offset = image_feat.shape[0], rank_offset(image_feat.shape[0])
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)
            momentum_update(self.momentum_pairs, self.momentum)
            image_feat_m = gather_no_grad(F.normalize(self.vision_proj_m(self.visual_encoder_m(images)[:, 0]), dim=-1))
            text_out_m = self.text_encoder_m(text_ids, text_mask)[:, 0]
            text_feat_m = gather_no_grad(F.normalize(self.text_proj_m(text_out_m), dim=-1))
            image_feat_all = torch.cat([image_feat_m.T, queues[0].clone()], dim=1)
            text_feat_all = torch.cat([text_feat_m.T, queues[1].clone()], dim=1)
            columns = torch.arange(batch, device=images.device) + offset
            all_ids = None
            if image_ids is None:
                positives = torch.zeros(batch, image_feat_all.shape[1], device=images.device)
                positives[torch.arange(batch), columns] = 1
            else:
                all_ids = gather_no_grad(image_ids)
                known = torch.cat([all_ids, id_queue.view(-1)]) if id_queue is not None else all_ids
                known = F.pad(known, (0, image_feat_all.shape[1] - known.shape[0]), value=-100)
                positives = (image_ids[:, None] == known[None, :]).float()
            local_m = slice(offset, offset + batch)
            i2t_targets = distilled_targets(image_feat_m[local_m] @ text_feat_all / self.temp, positives, alpha)
            t2i_targets = distilled_targets(text_feat_m[local_m] @ image_feat_all / self.temp, positives, alpha)
        sim_i2t = image_feat @ text_feat_all / self.temp
        sim_t2i = text_feat @ image_feat_all / self.temp
        loss = (itc_loss(sim_i2t, i2t_targets) + itc_loss(sim_t2i, t2i_targets)) / 2
        accuracy = (sim_i2t.argmax(1) == columns).float().mean()
        return ItcOutput(loss, accuracy, image_feat_m, text_feat_m, all_ids)

    def itm(
        self,
        image_embeds: torch.Tensor,
        image_feat: torch.Tensor,
        text_feat: torch.Tensor,
        text_ids: torch.Tensor,
        text_mask: torch.Tensor,
        image_ids: torch.Tensor | None,
    ) -> torch.Tensor:
        """ITM cross-entropy over B positives, B (negative image, text) and B (image, negative text) pairs."""
        with torch.no_grad():
            sim_i2t = image_feat @ gather_no_grad(text_feat).T / self.temp
            sim_t2i = text_feat @ gather_no_grad(image_feat).T / self.temp
        neg_images, neg_ids, neg_mask = sample_negatives(sim_i2t, sim_t2i, image_embeds, text_ids, text_mask, image_ids,
                                                         hard_share=self.itm_hard_share)  # fmt: skip
        # Negatives from other ranks may be padded wider than this rank's texts.
        text_ids, text_mask = (F.pad(t, (0, neg_ids.shape[1] - t.shape[1])) for t in (text_ids, text_mask))
        ids = torch.cat([text_ids, text_ids, neg_ids])
        mask = torch.cat([text_mask, text_mask, neg_mask])
        images = torch.cat([image_embeds, neg_images, image_embeds])
        logits = self.itm_logits(images, ids, mask)
        batch = image_embeds.shape[0]
        labels = torch.cat([torch.ones(batch), torch.zeros(2 * batch)]).long().to(logits.device)
        return F.cross_entropy(logits, labels)
