"""`blip caption`, `blip itm` and `blip export-hf` on our weights and on official-layout files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import BlipForConditionalGeneration, BlipProcessor

from blip.cli import main as blip_main
from blip.data.tokenizer import load_tokenizer
from blip.data.transforms import eval_transform
from blip.models.checkpoint import save_weights, stored_config
from blip.models.factory import build_model
from tests.conftest import TINY_BERT, write_params

CFG = TINY_BERT
TOKENIZER = load_tokenizer()


@pytest.fixture
def images(tmp_path: Path) -> list[Path]:
    paths = []
    for i, colour in enumerate([(200, 20, 20), (20, 20, 200)]):
        path = tmp_path / f"img{i}.png"
        Image.new("RGB", (80, 60), colour).save(path)
        paths.append(path)
    return paths


@pytest.fixture
def pretrained(tmp_path: Path) -> tuple[torch.nn.Module, Path]:
    torch.manual_seed(0)
    model = build_model("pretrain", CFG, TOKENIZER, queue_size=64).eval()
    return model, save_weights(model, tmp_path / "pretrain.safetensors", "bert-base-uncased-offline")


def test_weights_file_carries_its_config(pretrained: tuple) -> None:
    _, path = pretrained
    assert stored_config(path) == (CFG, "bert-base-uncased-offline")


def test_caption_command(pretrained: tuple, images: list[Path], capsys: pytest.CaptureFixture[str]) -> None:
    model, path = pretrained
    assert blip_main(["caption", "--weights", str(path), "--method", "greedy", "--max-length", "12",
                      *map(str, images)]) == 0  # fmt: skip
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(p) for p in images]
    # The command's captions are the captioner's own, built from the same pretraining file.
    captioner = build_model("caption", CFG, TOKENIZER).eval()
    captioner.load_state_dict(
        {k: v for k, v in model.state_dict().items() if k.startswith(("visual_encoder.", "text_decoder."))},
        strict=False,
    )
    from blip.models.generation import GenerationConfig

    pixels = torch.stack([eval_transform(CFG.image_size)(Image.open(p).convert("RGB")) for p in images])
    expected = captioner.generate(pixels, GenerationConfig("greedy", max_length=12))
    assert [line.split("\t")[1] for line in lines] == [TOKENIZER.decode(i, skip_special_tokens=True) for i in expected]


def test_itm_command_on_an_official_pth(
    pretrained: tuple, images: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model, _ = pretrained
    official = tmp_path / "model_base.pth"
    torch.save({"model": model.state_dict(), "epoch": 1}, official)
    texts = ["a red square", "a blue square"]
    bert = ["--set", "tokenizer.name=bert-base-uncased-offline"]  # an official file says nothing of its tokenizer
    assert blip_main(["itm", "--weights", str(official), *bert, str(images[0]), *texts]) == 0
    rows = [line.split("\t") for line in capsys.readouterr().out.strip().splitlines()[1:]]
    pixels = eval_transform(CFG.image_size)(Image.open(images[0]).convert("RGB"))[None].expand(2, -1, -1, -1)
    batch = TOKENIZER(texts, padding="longest", return_tensors="pt")
    probability, similarity = model.score_pairs(pixels, batch.input_ids, batch.attention_mask)
    assert [r[2] for r in rows] == texts
    assert [float(r[0]) for r in rows] == pytest.approx(probability.tolist(), abs=1e-4)
    assert [float(r[1]) for r in rows] == pytest.approx(similarity.tolist(), abs=1e-4)


def test_official_file_needs_the_matching_config(
    pretrained: tuple, images: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model, _ = pretrained
    official = tmp_path / "model.pth"
    torch.save({"model": model.state_dict()}, official)
    params = write_params(
        tmp_path,
        model={"vision_width": 48, "vision_heads": 4},
        tokenizer={"name": "bert-base-uncased-offline", "max_length": 35},
    )
    with pytest.raises(ValueError, match="shape"):
        blip_main(["itm", "--params", str(params), "--weights", str(official), str(images[0]), "x"])


def test_export_hf_command_loads_in_transformers(pretrained: tuple, tmp_path: Path) -> None:
    _, path = pretrained
    out = tmp_path / "hf-caption"
    assert blip_main(["export-hf", "--weights", str(path), "--task", "caption", "--out", str(out)]) == 0
    model = BlipForConditionalGeneration.from_pretrained(out)
    processor = BlipProcessor.from_pretrained(out)
    assert model.config.vision_config.layer_norm_eps == 1e-6
    assert processor.tokenizer.convert_tokens_to_ids("[DEC]") == 30522
    inputs = processor(images=Image.new("RGB", (64, 64)), text="a picture of", return_tensors="pt")
    assert inputs.pixel_values.shape == (1, 3, CFG.image_size, CFG.image_size)
    assert model.generate(**inputs, max_length=8).shape[0] == 1
