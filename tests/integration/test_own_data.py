"""The README's "Your own data and weights" section, run as written: a user's images, caption files and
single-answer VQA JSON, and transformers folders written by transformers itself (random weights, small sizes)."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import BlipForConditionalGeneration, BlipForQuestionAnswering

from blip.eval.vqa_accuracy import normalize_answer
from blip.models.checkpoint import stored_config
from tests.conftest import REPO
from tests.unit.test_hf_import import IMAGE_SIZE, save_transformers_folder, small_blip_config

pytestmark = pytest.mark.slow
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (30, 60, 220), "yellow": (230, 220, 40)}
SHAPES = ("square", "stripe")


def readme_blocks() -> tuple[str, list[str]]:
    """The section's params file and its commands."""
    section = (REPO / "README.md").read_text().split("## Your own data and weights", 1)[1].split("\n## ", 1)[0]
    (params,) = re.findall(r"```yaml\n(.*?)```", section, re.S)
    (commands,) = re.findall(r"```bash\n(.*?)```", section, re.S)
    return params, [line for line in commands.splitlines() if line.strip()]


def picture(colour: str, shape: str, mode: str, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 60, (48, 64, 3), dtype=np.uint8)
    rows = slice(8, 40) if shape == "square" else slice(20, 28)
    pixels[rows, 16:48] = COLOURS[colour]
    image = Image.fromarray(pixels)
    if mode == "RGBA":  # a transparent border, as cut-out product photos have
        alpha = np.full((48, 64), 255, dtype=np.uint8)
        alpha[:4] = 0
        image.putalpha(Image.fromarray(alpha))
    return image.convert(mode)


def write_dataset(root: Path) -> None:
    """RGBA PNGs, a grey JPEG and RGB JPEGs with caption files; VQA JSON with one answer per question."""
    items = [(c, s) for c in COLOURS for s in SHAPES]
    for split, count in (("train", 8), ("test", 4)):
        folder = root / "captions" / split
        folder.mkdir(parents=True)
        for index, (colour, shape) in enumerate(items[:count] if split == "train" else items[-count:]):
            mode = ("RGBA", "L", "RGB")[index % 3]
            suffix = ".png" if mode == "RGBA" else ".jpg"
            picture(colour, shape, mode, index).save(folder / f"{split}{index}{suffix}")
            (folder / f"{split}{index}.txt").write_text(f"a {colour} {shape}\nA {shape} that is {colour}.\n")
    images = root / "vqa" / "images"
    images.mkdir(parents=True)
    questions = []
    for index, (colour, shape) in enumerate(items):
        name = f"q{index}.png"
        picture(colour, shape, "RGBA" if index % 2 else "RGB", 100 + index).save(images / name)
        questions.append({"question_id": 2 * index, "image": name, "question": "what colour is it?", "answer": colour})
        questions.append({"question_id": 2 * index + 1, "image": name, "question": "what shape is it?",
                          "answer": [shape]})  # fmt: skip
    (root / "vqa" / "train.json").write_text(json.dumps(questions[:12]))
    (root / "vqa" / "test.json").write_text(json.dumps(questions[12:]))
    picture("blue", "square", "RGB", 7).save(root / "new-photo.jpg")


def test_own_data_section_runs_as_written(tmp_path: Path) -> None:
    params, commands = readme_blocks()
    data = tmp_path / "my-data"
    write_dataset(data)
    torch.manual_seed(0)
    save_transformers_folder(BlipForConditionalGeneration(small_blip_config()), data / "blip-caption", seed=1)
    save_transformers_folder(BlipForQuestionAnswering(small_blip_config(48)), data / "blip-vqa", seed=2)
    (tmp_path / "own.yaml").write_text(params)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}  # fmt: skip
    outputs = []
    for command in commands:
        done = subprocess.run(command, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"
        outputs.append((done.stdout, done.stderr))

    manifest = json.loads((tmp_path / "data/own/manifest.json").read_text())
    assert {split: s["samples"] for split, s in manifest["splits"].items()} == {
        "own_train": 8, "own_test": 4, "own_vqa_train": 12, "own_vqa_test": 4}  # fmt: skip
    assert manifest["skipped"]["total"] == 0

    caption = json.loads((tmp_path / "metrics/own_caption.json").read_text())
    assert caption["images"] == 4 and math.isfinite(caption["loss"]) and caption["CIDEr"] >= 0
    assert "transformers BlipForConditionalGeneration" in "".join(outputs[1])
    config, tokenizer = stored_config(tmp_path / "models/own_caption.safetensors")
    assert tokenizer == "my-data/blip-caption"  # the folder's own tokenizer travels with the fine-tuned weights
    assert (config.image_size, config.vision_width, config.text_width) == (IMAGE_SIZE, 48, 32)

    vqa = json.loads((tmp_path / "metrics/own_vqa.json").read_text())
    assert vqa["metric"] == "exact_match" and vqa["questions"] == 4
    answers = {q["question_id"]: q["answer"] if isinstance(q["answer"], str) else q["answer"][0]
               for q in json.loads((data / "vqa/test.json").read_text())}  # fmt: skip
    for mode in ("rank", "generate"):  # the figure is the exact-match rate of the answers the stage wrote
        results = json.loads((tmp_path / f"reports/own_vqa/results_{mode}.json").read_text())
        right = [normalize_answer(r["answer"]) == normalize_answer(answers[r["question_id"]]) for r in results]
        assert vqa[f"{mode}_accuracy"] == pytest.approx(100 * sum(right) / len(right))
    # By hand: training answers red/green/blue twice each, square and stripe three times ("square" first); the test
    # questions ask the colour (yellow) and the shape (square, stripe) of two pictures. The majority answer
    # "square" and the per-type priors ("red", "square") are each right once in four: 25%, where the official
    # formula would score any answer 0 against one annotator.
    assert vqa["majority_answer_accuracy"] == vqa["type_prior_accuracy"] == 25.0

    (line,) = outputs[3][0].strip().splitlines()
    path, text = line.split("\t")
    assert path == "my-data/new-photo.jpg" and text.strip()
