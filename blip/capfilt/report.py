"""What CapFilt did, for people: counts, the filter's quality against the world's noise labels (measuring
only), score histograms, and a gallery of examples with their scores and the keep/drop decision. Each figure
names the rule that decided (score, threshold, how the threshold was set) so a reader can check every decision."""

from __future__ import annotations

import io
import textwrap
from pathlib import Path

import torch
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from PIL import Image

from blip.capfilt.units import UnitStats
from blip.config.tasks import CapfiltConfig
from blip.data.shards import shard_samples
from blip.eval.filter_quality import removal_quality, roc_auc

RANGES = {"itm": (0.0, 1.0), "itc": (-1.0, 1.0)}  # the manifest's fixed bins: comparable across runs
KEPT, DROPPED = "#1b7f3b", "#c62828"  # green / red, each also spelled out in the text


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
        if 0 < truth.sum() < truth.numel():  # can the filter tell a right synthetic caption from a wrong one?
            for name in ("itm", "itc"):
                synthetic = torch.tensor([v for s in stats for v in s.scores["synthetic"][name]])
                metrics[f"filter_auc_synthetic_{name}"] = roc_auc(synthetic, truth)
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


def rule_text(threshold: float, cfg: CapfiltConfig) -> str:
    """The keep rule as applied: one threshold on one score for every pair, web and synthetic alike."""
    if not cfg.use_filter:
        return "no filter (ablation): every pair kept"
    if cfg.threshold_rule == "fixed":
        how = "fixed threshold"
    elif cfg.threshold_rule == "top_fraction":
        how = f"the best {cfg.keep_fraction:.0%} of the web pairs"
    else:
        how = f"calibrated to keep {cfg.calibration_keep:.0%} of the held-out human pairs of {cfg.calibration_split}"
    return f"kept if {cfg.score.upper()} >= {threshold:.3f} ({how})"


def score_counts(stats: list[UnitStats]) -> dict:
    """Histograms of the filter's scores by origin over fixed ranges, for the manifest."""
    counts: dict = {}
    for name, (low, high) in RANGES.items():
        for origin in ("web", "synthetic"):
            values = torch.tensor([v for s in stats for v in s.scores[origin][name]])
            if values.numel():
                counts[f"{origin}_{name}"] = torch.histc(values, 20, low, high).int().tolist()
    return {"bins": 20, "ranges": RANGES, "counts": counts}


def histogram_figure(stats: list[UnitStats], threshold: float, cfg: CapfiltConfig) -> Figure:
    """ITM and ITC scores by origin, each axis fitted to its data; the deciding score's panel shows the threshold
    (the axis stretched to include it) and shades the dropped side."""
    figure = Figure(figsize=(12, 4.6))
    axes = figure.subplots(1, 2)
    for axis, name in zip(axes, RANGES, strict=True):
        values = {o: [v for s in stats for v in s.scores[o][name]] for o in ("web", "synthetic")}
        pooled = [v for vs in values.values() for v in vs]
        deciding = cfg.use_filter and name == cfg.score
        low, high = (min(pooled), max(pooled)) if pooled else (0.0, 1.0)
        bins = torch.linspace(low, high, 31).tolist() if high > low else 30
        for origin, vs in values.items():
            if vs:
                axis.hist(vs, bins=bins, alpha=0.6, label=f"{origin} ({len(vs)})")
        if deciding:
            low, high = min(low, threshold), max(high, threshold)
        margin = 0.05 * (high - low) or 0.05
        axis.set_xlim(low - margin, high + margin)
        if deciding:
            axis.axvspan(low - margin, threshold, color=DROPPED, alpha=0.08, label="dropped side")
            axis.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:.3f}")
        role = f"decides: kept if >= {threshold:.3f}" if deciding else "not used to filter"
        axis.set(xlabel=f"filter {name.upper()} score", ylabel="captions", title=f"{name.upper()} by origin ({role})")
        axis.legend(fontsize=8)
    figure.suptitle(f"CapFilt filter scores: {cfg.filter} on {', '.join(cfg.source_splits)}\n"
                    f"{rule_text(threshold, cfg)}", fontsize=10)  # fmt: skip
    figure.tight_layout()
    return figure


def score_histogram(stats: list[UnitStats], path: Path, threshold: float, cfg: CapfiltConfig) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    histogram_figure(stats, threshold, cfg).savefig(path, dpi=110)
    return path


def _images(url: str, keys: set[str]) -> dict[str, Image.Image]:
    found = {}
    for sample in shard_samples(url):
        if sample["__key__"] in keys:
            found[sample["__key__"]] = Image.open(io.BytesIO(sample["jpg"])).convert("RGB")
    return found


WRAP, FONT, LINE = 50, 9, 9 * 1.25  # characters per caption line, font size and line height (points)


def _pair_text(pair: dict, threshold: float, cfg: CapfiltConfig) -> str:
    """A decision line ("KEPT web  ITC 0.312 >= 0.238  ITM 0.41") over the whole caption, wrapped."""
    decision = "KEPT" if pair["kept"] else "DROPPED"
    other = "itc" if cfg.score == "itm" else "itm"
    value = pair[cfg.score]
    if cfg.use_filter:
        scores = f"{cfg.score.upper()} {value:.3f} {'>=' if value >= threshold else '<'} {threshold:.3f}"
    else:
        scores = f"{cfg.score.upper()} {value:.3f}"
    caption = textwrap.fill(pair["caption"], WRAP, initial_indent="  ", subsequent_indent="  ")
    return f"{decision:<7} {pair['origin']:<9} {scores}  {other.upper()} {pair[other]:.2f}\n{caption}"


def gallery_figure(examples: list[dict], images: dict[str, Image.Image], threshold: float, cfg: CapfiltConfig
                   ) -> Figure:  # fmt: skip
    """Each web image over its candidate captions, whole, green if kept and red if dropped, with the scores."""
    columns = 4
    rows = max(1, -(-len(examples) // columns))
    texts = [[_pair_text(p, threshold, cfg) for p in e["pairs"]] for e in examples]
    lines = [max((sum(t.count("\n") + 1.5 for t in cell) for cell in texts[r * columns : (r + 1) * columns]),
                 default=0) for r in range(rows)]  # fmt: skip
    text_in = [n * LINE / 72 + 0.15 for n in lines]  # inches under each row of images
    image_in, header_in = 3.4, 0.9
    height = header_in + rows * image_in + sum(text_in)
    figure = Figure(figsize=(4.3 * columns, height))
    ratios = [h for t in text_in for h in (image_in, t)]  # an image row, then its captions
    grid = figure.add_gridspec(2 * rows, columns, height_ratios=ratios, left=0.01, right=0.99, bottom=0.0,
                               top=1 - header_in / height, hspace=0, wspace=0.06)  # fmt: skip
    for index, (example, cell) in enumerate(zip(examples, texts, strict=True)):
        row, column = divmod(index, columns)
        picture = figure.add_subplot(grid[2 * row, column])
        picture.imshow(images[example["key"]], interpolation="nearest")
        picture.set_anchor("SW")  # the image sits right on top of its captions, left-aligned with them
        picture.set_axis_off()
        captions = figure.add_subplot(grid[2 * row + 1, column])
        captions.set_axis_off()
        offset = 3.0
        for pair, text in zip(example["pairs"], cell, strict=True):
            color = KEPT if pair["kept"] else DROPPED
            captions.annotate(text, (0, 1), xycoords="axes fraction", xytext=(0, -offset), textcoords="offset points",
                              va="top", fontsize=FONT, family="monospace", color=color)  # fmt: skip
            offset += (text.count("\n") + 1.5) * LINE
    figure.legend(handles=[Patch(color=KEPT, label="KEPT"), Patch(color=DROPPED, label="DROPPED")],
                  loc="upper right", ncols=2, fontsize=9, frameon=False)  # fmt: skip
    figure.suptitle(f"CapFilt examples, the first {len(examples)} images of {', '.join(cfg.source_splits)}: "
                    f"captioner {cfg.captioner}, filter {cfg.filter}\n{rule_text(threshold, cfg)}, "
                    "each caption judged on its own", x=0.01, ha="left", fontsize=11)  # fmt: skip
    return figure


def capfilt_gallery(stats: list[UnitStats], path: Path, threshold: float, cfg: CapfiltConfig) -> Path:
    """The first `cfg.gallery_images` examples, their images read back from the input shards."""
    examples = [(s.source, e) for s in stats for e in s.examples][: cfg.gallery_images]
    images: dict[str, Image.Image] = {}
    for url in {url for url, _ in examples}:
        images |= _images(url, {e["key"] for u, e in examples if u == url})
    path.parent.mkdir(parents=True, exist_ok=True)
    gallery_figure([e for _, e in examples], images, threshold, cfg).savefig(path, dpi=100)
    return path
