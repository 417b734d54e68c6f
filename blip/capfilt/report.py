"""What CapFilt did, for people: counts, the filter's quality against the world's noise labels (measuring
only), score histograms, and a gallery of examples with their scores and the keep/drop decision."""

from __future__ import annotations

import io
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from PIL import Image

from blip.capfilt.units import UnitStats
from blip.config.tasks import CapfiltConfig
from blip.data.shards import shard_samples
from blip.eval.filter_quality import removal_quality, roc_auc

RANGES = {"itm": (0.0, 1.0), "itc": (-1.0, 1.0)}


def capfilt_metrics(stats: list[UnitStats], threshold: float, cfg: CapfiltConfig) -> dict[str, float]:
    total = {o: sum(s.total.get(o, 0) for s in stats) for o in ("web", "synthetic", "human")}
    kept = {o: sum(s.kept.get(o, 0) for s in stats) for o in ("web", "synthetic", "human")}
    metrics: dict[str, float] = {"threshold": threshold, "skipped": float(sum(s.skipped for s in stats))}
    for origin in total:
        metrics[f"{origin}_total"], metrics[f"{origin}_kept"] = float(total[origin]), float(kept[origin])
    metrics["web_removed"] = float(total["web"] - kept["web"])
    metrics["pairs_out"] = float(sum(kept.values()))
    truth = torch.tensor([t for s in stats for t in s.synthetic_true], dtype=torch.bool)
    if truth.numel():  # how often the captioner was right, and how often the filter kept the right ones
        kept_synthetic = torch.tensor([v >= threshold or not cfg.use_filter for s in stats
                                       for v in s.scores["synthetic"][cfg.score]])  # fmt: skip
        metrics["synthetic_true"] = truth.double().mean().item()
        metrics["synthetic_kept_true"] = truth[kept_synthetic].double().mean().item() if kept_synthetic.any() else 0.0
    noisy = torch.tensor([n for s in stats for n in s.noisy], dtype=torch.bool)
    if noisy.numel() and noisy.any():  # the synthetic world recorded which web captions are noise
        for name in ("itm", "itc"):
            web = torch.tensor([v for s in stats for v in s.scores["web"][name]])
            metrics[f"filter_auc_{name}"] = roc_auc(-web, noisy)  # low match score = noise
        web = torch.tensor([v for s in stats for v in s.scores["web"][cfg.score]])
        removed = web < threshold if cfg.use_filter else torch.zeros_like(noisy)
        metrics |= {f"filter_{k}": v for k, v in removal_quality(removed, noisy).items()}
        kinds = [k for s in stats for k in s.noise]
        for kind in sorted({k for k in kinds if k}):
            mask = torch.tensor([k == kind for k in kinds])
            metrics[f"filter_recall_{kind}"] = removed[mask].double().mean().item()
    return metrics


def score_histogram(stats: list[UnitStats], path: Path | None) -> dict | Path:
    """Histograms of the filter's scores by origin: the counts (path None) or a PNG."""
    counts: dict = {}
    for name, (low, high) in RANGES.items():
        for origin in ("web", "synthetic"):
            values = torch.tensor([v for s in stats for v in s.scores[origin][name]])
            if values.numel():
                counts[f"{origin}_{name}"] = torch.histc(values, 20, low, high).int().tolist()
    if path is None:
        return {"bins": 20, "ranges": RANGES, "counts": counts}
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for axis, (name, (low, high)) in zip(axes, RANGES.items(), strict=True):
        for origin in ("web", "synthetic"):
            values = [v for s in stats for v in s.scores[origin][name]]
            if values:
                axis.hist(values, bins=20, range=(low, high), alpha=0.6, label=f"{origin} ({len(values)})")
        axis.set(xlabel=f"{name} score", ylabel="captions", title=f"filter {name.upper()} score by origin")
        axis.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _images(url: str, keys: set[str]) -> dict[str, Image.Image]:
    found = {}
    for sample in shard_samples(url):
        if sample["__key__"] in keys:
            found[sample["__key__"]] = Image.open(io.BytesIO(sample["jpg"])).convert("RGB")
    return found


def capfilt_gallery(stats: list[UnitStats], path: Path, count: int = 12) -> Path:
    """Web images with every candidate caption, its ITM / ITC scores, and whether it was kept."""
    examples = [(s.source, e) for s in stats for e in s.examples][:count]
    images: dict[str, Image.Image] = {}
    for url in {url for url, _ in examples}:
        images |= _images(url, {e["key"] for u, e in examples if u == url})
    columns = 4
    rows = max(1, -(-len(examples) // columns))
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 5.2 * rows), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, (_, example) in zip(axes.flat, examples, strict=False):
        axis.imshow(images[example["key"]], interpolation="nearest")
        lines = [f"{'KEPT' if p['kept'] else 'drop'} {p['origin']} itm={p['itm']:.2f} itc={p['itc']:.2f}\n"
                 f"  {textwrap.shorten(p['caption'], 48)}" for p in example["pairs"]]  # fmt: skip
        axis.set_title("\n".join(lines), fontsize=7, loc="left", family="monospace")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
