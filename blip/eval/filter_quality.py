"""How well a filter finds the noisy web captions, measured against labels the synthetic world records.
For reports only: the filter itself never sees the labels."""

from __future__ import annotations

import torch


def roc_auc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """Probability that a random positive scores above a random negative (ties count half): the ROC area."""
    positive = positive.bool()
    pos, neg = scores[positive].double(), scores[~positive].double()
    if pos.numel() == 0 or neg.numel() == 0:
        return float("nan")
    # Mann-Whitney U from ranks, tied values sharing their average rank.
    _, inverse = torch.unique(torch.cat([pos, neg]), return_inverse=True)  # indices into the sorted unique values
    counts = torch.bincount(inverse).double()
    average_rank = counts.cumsum(0) - (counts - 1) / 2  # 1-based: last rank of the tie group minus half its span
    ranks = average_rank[inverse]
    u = ranks[: pos.numel()].sum() - pos.numel() * (pos.numel() + 1) / 2
    return (u / (pos.numel() * neg.numel())).item()


def removal_quality(removed: torch.Tensor, noisy: torch.Tensor) -> dict[str, float]:
    """Precision (removed captions that were noise), recall (noise removed), and the share of clean captions
    removed with it."""
    removed, noisy = removed.bool(), noisy.bool()
    hits = (removed & noisy).sum().item()
    return {
        "precision": hits / max(removed.sum().item(), 1),
        "recall": hits / max(noisy.sum().item(), 1),
        "clean_removed": (removed & ~noisy).sum().item() / max((~noisy).sum().item(), 1),
    }
