"""Retrieval evaluation: chunked top-k equals the full computation; recall@K equals BLIP's brute-force ranking."""

from __future__ import annotations

import numpy as np
import torch

from blip.eval.retrieval import TopK, chunked_topk, itm_rerank, recall_at_k


def brute_force(scores_i2t: np.ndarray, text_image: np.ndarray) -> dict[str, float]:
    """BLIP's itm_eval, written out: full argsort per row."""
    img2txt = [np.where(text_image == i)[0] for i in range(scores_i2t.shape[0])]
    ranks = np.array([min(np.where(np.argsort(row)[::-1] == t)[0][0] for t in img2txt[i])
                      for i, row in enumerate(scores_i2t)])  # fmt: skip
    tr = [100.0 * np.mean(ranks < k) for k in (1, 5, 10)]
    ranks = np.array([np.where(np.argsort(row)[::-1] == text_image[t])[0][0] for t, row in enumerate(scores_i2t.T)])
    ir = [100.0 * np.mean(ranks < k) for k in (1, 5, 10)]
    return {"txt_r1": tr[0], "txt_r5": tr[1], "txt_r10": tr[2], "img_r1": ir[0], "img_r5": ir[1], "img_r10": ir[2]}


def full(scores: torch.Tensor) -> TopK:
    order = scores.argsort(dim=1, descending=True)
    return TopK(order, scores.gather(1, order))


def test_recall_matches_brute_force() -> None:
    generator = torch.Generator().manual_seed(0)
    images, per_image = 30, 5
    text_image = torch.arange(images).repeat_interleave(per_image)
    scores = torch.randn(images, images * per_image, generator=generator)
    scores += 1.0 * (text_image[None, :] == torch.arange(images)[:, None])  # better than chance, not perfect
    ours = recall_at_k(full(scores), full(scores.T.contiguous()), text_image)
    expected = brute_force(scores.numpy(), text_image.numpy())
    for name, value in expected.items():
        assert abs(ours[name] - value) < 1e-9, name
    assert 0 < ours["txt_r1"] < ours["txt_r10"] < 100
    assert ours["r_mean"] == (ours["txt_r_mean"] + ours["img_r_mean"]) / 2


def test_top_k_truncation_only_loses_ranks_beyond_k() -> None:
    generator = torch.Generator().manual_seed(1)
    text_image = torch.arange(20).repeat_interleave(2)
    scores = torch.randn(20, 40, generator=generator)
    truncated = TopK(*(t[:, :10] for t in (full(scores).indices, full(scores).scores)))
    transposed = full(scores.T.contiguous())
    short = TopK(transposed.indices[:, :10], transposed.scores[:, :10])
    assert recall_at_k(truncated, short, text_image) == recall_at_k(full(scores), transposed, text_image)


def test_chunked_topk_equals_full_topk() -> None:
    generator = torch.Generator().manual_seed(2)
    queries, keys = torch.randn(37, 8, generator=generator), torch.randn(53, 8, generator=generator)
    top = (queries @ keys.T).topk(7, dim=1)
    for key_chunk in (53, 10, 4):  # one key block; several; blocks smaller than k (merged across blocks)
        chunked = chunked_topk(queries, keys, k=7, chunk=5, key_chunk=key_chunk)
        assert torch.equal(chunked.indices, top.indices) and torch.allclose(chunked.scores, top.values)


class _FakeITM:
    """ITM logit = the text id's first token - the image's value: a known function to check the plumbing."""

    def itm_logits(self, images: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        match = ids[:, 0].float() - images[:, 0, 0]
        return torch.stack([-match, match], dim=1)


def test_itm_rerank_adds_itm_logit_to_itc_and_resorts() -> None:
    image_embeds = torch.tensor([0.0, 10.0, 20.0])[:, None, None].expand(3, 2, 4).contiguous()
    text_ids = torch.tensor([[5], [30], [12]])
    mask = torch.ones(3, 1, dtype=torch.long)
    candidates = TopK(torch.tensor([[0, 1, 2], [2, 0, 1]]), torch.tensor([[0.9, 0.5, 0.1], [0.8, 0.7, 0.6]]))
    out = itm_rerank(_FakeITM(), candidates, image_embeds, text_ids, mask, True, 2, torch.device("cpu"))
    # image 0: texts 0,1,2 -> logits 5, 30, 12 (+ ITC) -> order 1, 2, 0
    assert out.indices[0].tolist() == [1, 2, 0]
    assert torch.allclose(out.scores[0], torch.tensor([30.5, 12.1, 5.9]))
    # image 1 (value 10): texts 2, 0, 1 -> logits 2, -5, 20
    assert out.indices[1].tolist() == [1, 2, 0]
    texts = itm_rerank(_FakeITM(), TopK(torch.tensor([[2, 0]]), torch.tensor([[0.0, 0.0]])), image_embeds,
                       text_ids, mask, False, 8, torch.device("cpu"))  # fmt: skip
    assert texts.indices.tolist() == [[0, 2]]  # text 0 (id 5): image 0 scores 5, image 2 scores -15
