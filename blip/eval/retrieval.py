"""Image-text retrieval evaluation as BLIP does it, with memory bounded by a chunk size.

1. ITC similarities of every image with every text, computed in blocks of `chunk` query rows x `key_chunk` keys;
   only each row's top k survive (working memory set by the blocks; the result is N x k, never N x N); equal
   scores rank by index.
2. ITM re-ranks those k candidates in both directions; the final score is ITM logit (match) + ITC similarity,
   candidates outside the top k rank below all of them (BLIP fills them with -100).
3. Recall@1/5/10 both ways: image->text counts the best-ranked of an image's captions.

Under torchrun every rank computes the features (cheap) and re-ranks its own slice of the queries (the N x k
ITM passes, the expensive part); the slices are gathered so that every rank holds the same result.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizer

from blip.data.loader import eval_pipeline, make_loader
from blip.data.transforms import eval_transform
from blip.distributed import gather_objects, rank_slice
from blip.models.contrastive import DualEncoder


@dataclass
class TopK:
    """Per query row: the candidates' indices and scores, best first."""

    indices: torch.Tensor  # [queries, k]
    scores: torch.Tensor  # [queries, k]


def best_k(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, columns) of each row's k best scores, best first, ties to the lower column. torch.topk breaks ties
    arbitrarily, and differently for different k; captions repeat in real data sets (equal texts, equal
    features), so a ranking, and a recall, must not depend on the kernel."""
    k = min(k, scores.shape[1])
    kth = scores.topk(k, dim=1).values[:, -1:]
    above, tied = scores > kth, scores == kth
    chosen = above | (tied & (tied.cumsum(1) <= k - above.sum(1, keepdim=True)))
    columns = chosen.nonzero()[:, 1].view(-1, k)  # ascending within each row
    values = scores.gather(1, columns)
    order = values.sort(dim=1, descending=True, stable=True).indices
    return values.gather(1, order), columns.gather(1, order)


def merge_best(best: TopK | None, scores: torch.Tensor, ids: torch.Tensor, k: int) -> TopK:
    """A running top k (None before the first block) merged with a block's `scores` [rows, n], whose columns are
    `ids` [n]: later blocks hold higher ids and come second, so a tie still goes to the lower id."""
    values, columns = best_k(scores, k)
    found = ids[columns]
    if best is not None:
        values, keep = best_k(torch.cat([best.scores, values], dim=1), k)
        found = torch.cat([best.indices, found], dim=1).gather(1, keep)
    return TopK(found, values)


def chunked_topk(queries: torch.Tensor, keys: torch.Tensor, k: int, chunk: int, key_chunk: int = 16384) -> TopK:
    """Top-k of `queries @ keys.T`, `chunk` query rows x `key_chunk` keys at a time: working memory is set by the
    two chunk sizes, whatever the gallery size (a row's running top k is merged with each key block's)."""
    indices, scores = [], []
    for start in range(0, queries.shape[0], chunk):
        rows, best = queries[start : start + chunk], None
        for key_start in range(0, keys.shape[0], key_chunk):
            block = keys[key_start : key_start + key_chunk]
            ids = torch.arange(key_start, key_start + len(block), device=keys.device)
            best = merge_best(best, rows @ block.T, ids, k)
        indices.append(best.indices.cpu())
        scores.append(best.scores.float().cpu())
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


@dataclass
class PairSplit:
    """The first images of a split and all their captions; `text_image[t]` is the image caption t describes."""

    images: torch.Tensor  # [N, 3, H, W]
    image_ids: list[str]
    texts: list[str]
    text_image: torch.Tensor
    scenes: list[dict | None]  # the synthetic world's truth per image, for measuring only (None elsewhere)


def load_pair_split(urls: list[str], image_size: int, max_images: int) -> PairSplit:
    images: list[torch.Tensor] = []
    image_ids: list[str] = []
    texts: list[str] = []
    text_image: list[int] = []
    scenes: list[dict | None] = []
    for batch in make_loader(eval_pipeline(urls, "pairs", eval_transform(image_size), 64), 0):
        for image, record, captions in zip(batch.get("image", []), batch["record"], batch["text"], strict=False):
            if len(images) == max_images:
                break
            texts += captions
            text_image += [len(images)] * len(captions)
            images.append(image)
            image_ids.append(record["image_id"])
            scenes.append(record.get("world", {}).get("scene"))
    if len(images) < 2:
        where = urls[0] + (f" and {len(urls) - 1} more shards" if len(urls) > 1 else "")
        raise ValueError(f"{where}: retrieval needs at least 2 images, found {len(images)}")
    return PairSplit(torch.stack(images), image_ids, texts, torch.tensor(text_image), scenes)


@torch.no_grad()
def evaluate_retrieval(
    model: DualEncoder,
    split: PairSplit,
    tokenizer: PreTrainedTokenizer,
    max_length: int,
    k: int,
    chunk: int,
    itm_batch: int,
    device: torch.device,
) -> dict[str, tuple[TopK, TopK]]:
    """(image->text, text->image) rankings of ITC alone and of ITC + ITM re-ranking (BLIP's reported numbers)."""
    was_training = model.training
    model.eval()
    embeds, image_feat = [], []
    for images in split.images.split(64):
        tokens, feat = model.image_features(images.to(device))
        embeds.append(tokens.cpu())  # all image tokens stay in host memory; ITM moves a batch at a time
        image_feat.append(feat)
    image_embeds, image_feat = torch.cat(embeds), torch.cat(image_feat)
    tokens = tokenizer(split.texts, padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
    text_feat = torch.cat([model.text_features(ids.to(device), mask.to(device))
                           for ids, mask in zip(tokens.input_ids.split(256), tokens.attention_mask.split(256),
                                                strict=True)])  # fmt: skip
    i2t = chunked_topk(image_feat, text_feat, k, chunk)
    t2i = chunked_topk(text_feat, image_feat, k, chunk)
    reranked = []
    for candidates, image_queries in ((i2t, True), (t2i, False)):
        mine = rank_slice(candidates.indices.shape[0])
        part = itm_rerank(model, TopK(candidates.indices[mine], candidates.scores[mine]), image_embeds,
                          tokens.input_ids, tokens.attention_mask, image_queries, itm_batch, device)  # fmt: skip
        parts = gather_objects(part)  # every rank's rows, in rank order
        reranked.append(TopK(torch.cat([p.indices for p in parts]), torch.cat([p.scores for p in parts])))
    model.train(was_training)
    return {"itc": (i2t, t2i), "itm": (reranked[0], reranked[1])}
