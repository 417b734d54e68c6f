"""Training curves as a PNG (for people and MLflow) and a CSV (for `dvc plots`)."""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on training machines
import matplotlib.pyplot as plt


def write_history_csv(history: list[dict[str, float]], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(k for row in history for k in row))
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(history)
    return path


def plot_history(history: list[dict[str, float]], path: Path, title: str) -> Path:
    """One panel of losses (every key but step/lr/throughput) and one of the learning rate."""
    path.parent.mkdir(parents=True, exist_ok=True)
    steps = [row["step"] for row in history]
    losses = [k for k in history[0] if k not in ("step", "lr", "samples_per_s") and "accuracy" not in k]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name in losses:
        left.plot(steps, [row[name] for row in history], label=name)
    left.set(xlabel="step", ylabel="loss", title=title)
    left.legend()
    left.grid(alpha=0.3)
    right.plot(steps, [row["lr"] for row in history], color="black")
    right.set(xlabel="step", ylabel="learning rate", title="schedule")
    right.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_recall(curves: dict[str, dict[str, float]], chance_r1: float, path: Path, title: str) -> Path:
    """Recall@K (K = 1, 5, 10) of each method, image->text and text->image, with the chance level at K=1."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ks = (1, 5, 10)
    figure, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for axis, (prefix, direction) in zip(axes, (("txt", "image -> text"), ("img", "text -> image")), strict=True):
        for label, recall in curves.items():
            axis.plot(ks, [recall[f"{prefix}_r{k}"] for k in ks], marker="o", label=label)
        axis.axhline(chance_r1, color="grey", linestyle="--", label="chance R@1")
        axis.set(xlabel="K", xticks=ks, title=f"{title}: {direction}", ylim=(0, 100))
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("recall@K (%)")
    axes[0].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
