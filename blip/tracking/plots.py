"""Training curves as a PNG (for people and MLflow) and a CSV (for `dvc plots`)."""

from __future__ import annotations

import csv
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on training machines
import matplotlib.pyplot as plt
from matplotlib.figure import Figure


def write_history_csv(history: list[dict[str, float]], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(k for row in history for k in row))
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(history)
    return path


def history_figure(history: list[dict[str, float]], title: str, schedule: str | None = None) -> Figure:
    """One panel of losses (every key but step/lr/throughput) and one of the learning rate as logged (the rate of
    each log window's last step). `schedule` names the schedule in the panel's title; without it the title says
    only what the points are, since a per-epoch cosine over few epochs looks like step decay and vice versa."""
    steps = [row["step"] for row in history]
    losses = [k for k in history[0] if k not in ("step", "lr", "samples_per_s") and "accuracy" not in k]
    figure = Figure(figsize=(11, 4))
    left, right = figure.subplots(1, 2)
    for name in losses:
        left.plot(steps, [row[name] for row in history], label=name)
    left.set(xlabel="step", ylabel="loss", title=title)
    left.legend()
    left.grid(alpha=0.3)
    right.plot(steps, [row["lr"] for row in history], color="black", marker=".")
    what = f"learning rate: {schedule}" if schedule else "learning rate at each logged step"
    right.set(xlabel="step", ylabel="learning rate")
    right.set_title(textwrap.fill(what, 60), fontsize=10)
    right.grid(alpha=0.3)
    figure.tight_layout()
    return figure


def plot_history(history: list[dict[str, float]], path: Path, title: str, schedule: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    history_figure(history, title, schedule).savefig(path, dpi=110)
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
