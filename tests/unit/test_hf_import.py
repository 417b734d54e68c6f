"""Weights from transformers BLIP folders: folders transformers writes itself, our export round trip, refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    BertConfig,
    BertModel,
    Blip2Config,
    BlipConfig,
    BlipForConditionalGeneration,
    BlipForImageTextRetrieval,
    BlipForQuestionAnswering,
    BlipImageProcessor,
    BlipModel,
    BlipProcessor,
    CLIPConfig,
)

from blip.cli import main as blip_main
from blip.config import ConfigError
from blip.data.tokenizer import load_tokenizer
from blip.data.transforms import CLIP_MEAN, CLIP_STD, eval_transform
from blip.models.checkpoint import save_weights
from blip.models.factory import build_model, load_trained, read_weights
from blip.models.import_hf import NotBlipFolderError
from tests.conftest import TINY_BERT

TOKENIZER = load_tokenizer()
IMAGE_SIZE = 32
PROMPT_IDS = TOKENIZER(["a picture of"], return_tensors="pt").input_ids  # [CLS] a picture of [SEP]


def small_blip_config(text_width: int = 32) -> BlipConfig:
    """Small, and unlike our defaults where transformers' differ (vision LayerNorm eps 1e-5, FFN 3 x width).
    VQA needs the text width equal to the vision width (48) in the port."""
    text = {"vocab_size": len(TOKENIZER), "hidden_size": text_width, "encoder_hidden_size": 48, "intermediate_size": 96,
            "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 40}  # fmt: skip
    vision = {"hidden_size": 48, "intermediate_size": 192, "num_hidden_layers": 2, "num_attention_heads": 4,
              "image_size": IMAGE_SIZE, "patch_size": 16, "layer_norm_eps": 1e-5}  # fmt: skip
    return BlipConfig(text_config=text, vision_config=vision, image_text_hidden_size=24)


def save_transformers_folder(model: torch.nn.Module, folder: Path, seed: int) -> Path:
    """transformers' own random init moved away from it (its ViT starts near zero), then `save_pretrained` of
    the model and of a BlipProcessor, as users of the port write them."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.1)
    model.save_pretrained(folder)
    processor = BlipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_mean=list(CLIP_MEAN),
                                   image_std=list(CLIP_STD))  # fmt: skip
    BlipProcessor(image_processor=processor, tokenizer=TOKENIZER).save_pretrained(folder)
    return folder


@pytest.fixture
def images(tmp_path: Path) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for index in range(3):
        pixels = rng.integers(0, 256, (40 + 10 * index, 56, 3), dtype=np.uint8)
        pixels[:, : 10 * (index + 1)] = (255 * (index % 2), 80 * index, 200)  # a coloured band of its own
        paths.append(tmp_path / f"image{index}.png")
        Image.fromarray(pixels).save(paths[-1])
    return paths


def pixels(paths: list[Path]) -> torch.Tensor:
    """BLIP's own preprocessing (bicubic resize of the PIL image, CLIP mean/std), which `blip` applies."""
    return torch.stack([eval_transform(IMAGE_SIZE)(Image.open(p).convert("RGB")) for p in paths])


def test_a_folder_transformers_wrote_captions_as_transformers_does(
    tmp_path: Path, images: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    torch.manual_seed(0)
    theirs = BlipForConditionalGeneration(small_blip_config()).eval()
    folder = save_transformers_folder(theirs, tmp_path / "blip-caption", seed=1)
    assert blip_main(["caption", "--weights", str(folder), *map(str, images)]) == 0  # beam 3, 5-20 tokens
    out = capsys.readouterr()
    ours = [line.split("\t")[1] for line in out.out.strip().splitlines()]
    assert "transformers BlipForConditionalGeneration" in out.err and "fresh: nothing" in out.err

    with torch.no_grad():
        generated = theirs.generate(pixel_values=pixels(images), input_ids=PROMPT_IDS.repeat(len(images), 1),
                                    num_beams=3, max_length=20, min_length=5)  # fmt: skip
    expected = [TOKENIZER.decode(row[4:], skip_special_tokens=True) for row in generated.tolist()]  # prompt cut
    assert ours == expected
    assert len(set(ours)) == len(ours)  # the images matter: a test of the vision side too


def test_itm_of_a_folder_transformers_wrote_matches_transformers(
    tmp_path: Path, images: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    torch.manual_seed(0)
    theirs = BlipForImageTextRetrieval(small_blip_config()).eval()
    folder = save_transformers_folder(theirs, tmp_path / "blip-itm", seed=2)
    texts = ["a red circle", "two shapes on the left of a blue square", "x"]
    assert blip_main(["itm", "--weights", str(folder), str(images[0]), *texts]) == 0
    rows = [line.split("\t") for line in capsys.readouterr().out.strip().splitlines()[1:]]

    batch = TOKENIZER(texts, padding="longest", return_tensors="pt")
    enc_ids = batch.input_ids.clone()
    enc_ids[:, 0] = TOKENIZER.convert_tokens_to_ids("[ENC]")  # BLIP's ITM input; the port leaves it to the caller
    image = pixels(images[:1]).expand(len(texts), -1, -1, -1)
    with torch.no_grad():
        itm = theirs(pixel_values=image, input_ids=enc_ids, attention_mask=batch.attention_mask).itm_score
        itc = theirs(pixel_values=image, input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                     use_itm_head=False).itm_score  # fmt: skip
    assert [float(r[0]) for r in rows] == pytest.approx(itm.softmax(-1)[:, 1].tolist(), abs=1e-4)
    assert [float(r[1]) for r in rows] == pytest.approx(itc.diagonal().tolist(), abs=1e-4)


@pytest.mark.parametrize("task", ["caption", "retrieval", "vqa"])
def test_export_then_import_gives_bit_identical_weights(tmp_path: Path, task: str) -> None:
    torch.manual_seed(0)
    model = build_model(task, TINY_BERT, TOKENIZER, **({"queue_size": 64} if task == "retrieval" else {}))
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    ours = save_weights(model, tmp_path / f"{task}.safetensors", "bert-base-uncased-offline")
    folder = tmp_path / f"hf-{task}"
    assert blip_main(["export-hf", "--weights", str(ours), "--task", task, "--out", str(folder)]) == 0

    imported = read_weights(folder)
    architecture = ("image_size", "patch_size", "vision_width", "vision_depth", "vision_heads", "text_width",
                    "text_depth", "text_heads", "vocab_size", "embed_dim", "max_text_positions")  # fmt: skip
    assert {k: getattr(imported.model, k) for k in architecture} == {k: getattr(TINY_BERT, k) for k in architecture}
    original = model.state_dict()
    momentum_or_queue = [k for k in original if k.split(".")[0].endswith("_m") or "queue" in k or k == "temp"]
    lm_head = "text_decoder.cls.predictions.decoder.weight"  # tied to the word embeddings: stored once
    exported = [k for k in original if k not in momentum_or_queue and k != lm_head]
    assert sorted(imported.state) == sorted(exported)  # every part of the task, nothing else
    assert all(torch.equal(imported.state[k], original[k]) for k in exported)
    # ... and loaded into a model: every weight equal, momentum copies (retrieval) from the imported online ones.
    reloaded, _ = load_trained(task, folder, None, None)
    assert all(torch.equal(reloaded.state_dict()[k], original[k]) for k in original if k not in momentum_or_queue)
    # A transformers folder is accepted by export-hf too: exported again, the same weights.
    again = tmp_path / f"hf-{task}-again"
    assert blip_main(["export-hf", "--weights", str(folder), "--task", task, "--out", str(again)]) == 0
    assert all(torch.equal(read_weights(again).state[k], imported.state[k]) for k in exported)


def test_pretraining_towers_from_a_blip_folder(tmp_path: Path) -> None:
    torch.manual_seed(0)
    folder = save_transformers_folder(BlipForQuestionAnswering(small_blip_config(48)), tmp_path / "blip-vqa", seed=3)
    state = read_weights(folder).state
    cfg = read_weights(folder).model.model_copy(update={"vit_init": str(folder), "bert_init": str(folder)})
    model = build_model("pretrain", cfg, TOKENIZER, queue_size=16)
    own = model.state_dict()
    vision = [k for k in state if k.startswith("visual_encoder.")]
    assert vision and all(torch.equal(own[k], state[k]) for k in vision)
    # The encoder from the folder's encoder; the decoder's own self-attention from the folder's decoder.
    for key in ("text_encoder.encoder.layer.1.crossattention.self.key.weight",
                "text_decoder.bert.encoder.layer.0.attention.self.query.weight"):  # fmt: skip
        assert torch.equal(own[key], state[key])
    momentum_qkv = own["visual_encoder_m.blocks.0.attn.qkv.weight"]
    assert torch.equal(momentum_qkv, state["visual_encoder.blocks.0.attn.qkv.weight"])


def test_a_folder_without_a_tokenizer_uses_the_configured_one(tmp_path: Path, images: list[Path]) -> None:
    torch.manual_seed(0)
    folder = tmp_path / "model-only"
    BlipForConditionalGeneration(small_blip_config()).save_pretrained(folder)  # no processor, no tokenizer
    assert read_weights(folder).tokenizer is None
    assert read_weights(folder).model.image_size == IMAGE_SIZE  # from config.json's vision_config
    assert blip_main(["caption", "--weights", str(folder), "--set", "tokenizer.name=bert-base-uncased-offline",
                      "--method", "greedy", str(images[0])]) == 0  # fmt: skip


def _save_config_only(config: object, folder: Path) -> Path:
    config.save_pretrained(folder)  # type: ignore[attr-defined]
    return folder


def _save_bert(folder: Path) -> Path:
    config = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    BertModel(config).save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    ("make", "found"),
    [
        (lambda d: _save_config_only(Blip2Config(), d), "model_type 'blip-2'"),
        (lambda d: _save_config_only(CLIPConfig(), d), "model_type 'clip'"),
        (_save_bert, "BertModel"),
        (lambda d: BlipModel(small_blip_config()).save_pretrained(d) or d, "BlipModel"),
    ],
)
def test_other_architectures_are_refused_by_name(tmp_path: Path, make: object, found: str) -> None:
    folder = tmp_path / "other"
    make(folder)  # type: ignore[operator]
    with pytest.raises(NotBlipFolderError, match=found):
        read_weights(folder)
    assert isinstance(NotBlipFolderError("x"), ConfigError)  # `blip` prints it and exits 2


def test_a_vqa_folder_whose_decoder_cannot_attend_to_its_questions_is_refused(tmp_path: Path) -> None:
    BlipForQuestionAnswering(small_blip_config(32)).save_pretrained(tmp_path / "vqa")  # vision 48, text 32
    with pytest.raises(NotBlipFolderError, match="answer decoder of the vision width 48 for questions 32 wide"):
        read_weights(tmp_path / "vqa")


def test_blip_vqa_answer_decoder_attends_with_the_text_width() -> None:
    cfg = TINY_BERT.model_copy(update={"text_width": 64, "text_heads": 4})  # vision 96, as ViT-L 1024 vs BERT 768
    model = build_model("vqa", cfg, TOKENIZER).eval()
    key = model.text_decoder.bert.encoder.layer[0].crossattention.self.key
    assert key.in_features == 64 and model.text_encoder.encoder.layer[0].crossattention.self.key.in_features == 96
    question = TOKENIZER(["what colour is it?"], return_tensors="pt")
    (answer,) = model.generate(torch.randn(1, 3, cfg.image_size, cfg.image_size), question.input_ids,
                               question.attention_mask)  # fmt: skip
    assert isinstance(answer, list)


def test_a_folder_without_config_is_named(tmp_path: Path) -> None:
    (tmp_path / "weights").mkdir()
    with pytest.raises(ConfigError, match=r"without config\.json"):
        read_weights(tmp_path / "weights")
