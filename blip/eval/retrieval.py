"""Image-text retrieval evaluation as BLIP does it, with memory bounded by a chunk size.

1. ITC similarities of every image with every text, computed `chunk` rows at a time; only each row's top k
   survive (memory N x k, never N x N on the device).
2. ITM re-ranks those k candidates in both directions; the final score is ITM logit (match) + ITC similarity,
   candidates outside the top k rank below all of them (BLIP fills them with -100).
3. Recall@1/5/10 both ways: image->text counts the best-ranked of an image's captions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from blip.models.contrastive import DualEncoder


@dataclass
class TopK:
    """Per query row: the candidates' indices and scores, best first."""

    indices: torch.Tensor  # [queries, k]
    scores: torch.Tensor  # [queries, k]


def chunked_topk(queries: torch.Tensor, keys: torch.Tensor, k: int, chunk: int) -> TopK:
    """Top-k of `queries @ keys.T` without materialising more than `chunk` rows of it at once."""
    k = min(k, keys.shape[0])
    indices, scores = [], []
    for start in range(0, queries.shape[0], chunk):
        block = queries[start : start + chunk] @ keys.T
        top = block.topk(k, dim=1)
        indices.append(top.indices.cpu())
        scores.append(top.values.float().cpu())
    return TopK(torch.cat(indices), torch.cat(scores))


@torch.no_grad()
def itm_rerank(
    model: DualEncoder,
    candidates: TopK,
    image_embeds: torch.Tensor,
    text_ids: torch.Tensor,
    text_mask: torch.Tensor,
    image_queries: bool,
    batch: int,
    device: torch.device,
) -> TopK:
    """Re-score each query's candidates by ITM logit + ITC similarity and re-sort them."""
    queries, k = candidates.indices.shape
    rows = torch.arange(queries).repeat_interleave(k)
    cols = candidates.indices.flatten()
    image_rows, text_rows = (rows, cols) if image_queries else (cols, rows)
    logits = []
    for start in range(0, rows.numel(), batch):
        images = image_embeds[image_rows[start : start + batch]].to(device)
        ids = text_ids[text_rows[start : start + batch]].to(device)
        mask = text_mask[text_rows[start : start + batch]].to(device)
        logits.append(model.itm_logits(images, ids, mask)[:, 1].float().cpu())
    final = torch.cat(logits).view(queries, k) + candidates.scores
    order = final.argsort(dim=1, descending=True)
    return TopK(candidates.indices.gather(1, order), final.gather(1, order))


def recall_at_k(i2t: TopK, t2i: TopK, text_image: torch.Tensor, ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """BLIP's retrieval metrics in percent: txt_r{k} (image->text), img_r{k} (text->image), their means.

    `text_image[t]` is the image text t describes; a candidate list shorter than K can only miss.
    """
    images = torch.arange(i2t.indices.shape[0])
    # image->text: rank of the first of the image's own captions among its candidates
    own_text = text_image[i2t.indices] == images[:, None]
    text_rank = torch.where(own_text.any(1), own_text.float().argmax(1), torch.full_like(images, 10**9))
    own_image = t2i.indices == text_image[:, None]
    image_rank = torch.where(own_image.any(1), own_image.float().argmax(1), torch.full_like(text_image, 10**9))
    out = {}
    for k in ks:
        out[f"txt_r{k}"] = 100.0 * (text_rank < k).double().mean().item()
        out[f"img_r{k}"] = 100.0 * (image_rank < k).double().mean().item()
    out["txt_r_mean"] = sum(out[f"txt_r{k}"] for k in ks) / len(ks)
    out["img_r_mean"] = sum(out[f"img_r{k}"] for k in ks) / len(ks)
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    return out
