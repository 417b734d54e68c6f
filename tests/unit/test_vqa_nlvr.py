"""VQA (parity with transformers' generation, answer ranking, weighted loss) and NLVR2 (twin cross-attention)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from transformers import BlipForQuestionAnswering

from blip.data.tokenizer import BERT_SPECIAL_TOKENS as T
from blip.data.tokenizer import load_tokenizer
from blip.models.export_hf import export_hf
from blip.models.factory import load_official
from blip.models.med import lm_loss
from blip.models.nlvr import BlipNLVR
from blip.models.pretrain import BlipPretrain
from blip.models.vqa import BlipVQA
from tests.conftest import TINY_BERT
from tests.unit.test_hf_parity import hf_ids, perturbed

TOKENIZER = load_tokenizer()
CFG = TINY_BERT.model_copy(update={"text_dropout": 0.0})
ANSWERS = ["yes", "no", "2", "red", "top left", "purple"]


def tokens(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    batch = TOKENIZER(texts, return_tensors="pt", padding=True)
    return batch.input_ids, batch.attention_mask


def answer_loss_by_hand(vqa: BlipVQA, states: torch.Tensor, q_mask: torch.Tensor, ids: torch.Tensor,
                        mask: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """Summed label-smoothed loss of [DEC] answer [SEP] from the decoder's logits at every position."""
    dec = ids.clone()
    dec[:, 0] = T.bos
    logits = vqa.text_decoder(dec, mask, states, q_mask)
    return lm_loss(logits[:, :-1], ids.masked_fill(mask == 0, -100)[:, 1:], 0.1, reduction="none")


@pytest.fixture(scope="module")
def vqa() -> BlipVQA:
    torch.manual_seed(0)
    model = perturbed(BlipVQA(CFG, T), 3)
    with torch.no_grad():
        model.text_decoder.cls.predictions.bias[T.sep] += 1.5
    return model


def test_vqa_generated_answers_match_transformers(vqa: BlipVQA, tmp_path: Path) -> None:
    reference = BlipForQuestionAnswering.from_pretrained(
        export_hf(vqa.state_dict(), CFG, TOKENIZER, "vqa", tmp_path / "vqa")
    ).eval()
    images = torch.randn(3, 3, CFG.image_size, CFG.image_size, generator=torch.Generator().manual_seed(1))
    ids, mask = tokens(["what color is the circle?", "how many shapes are there?", "is there a red square?"])
    mine = vqa.generate(images, ids, mask)
    enc = ids.clone()
    enc[:, 0] = T.enc
    theirs = reference.generate(
        pixel_values=images, input_ids=enc, attention_mask=mask, num_beams=3, max_length=10, min_length=1
    )
    assert mine == hf_ids(theirs.tolist(), 1)
    assert any(len(answer) < 9 for answer in mine)  # some answers end before the length limit


def test_answer_ranking_equals_brute_force(vqa: BlipVQA) -> None:
    images = torch.randn(2, 3, CFG.image_size, CFG.image_size, generator=torch.Generator().manual_seed(2))
    q_ids, q_mask = tokens(["what color is the circle?", "is there a square?"])
    a_ids, a_mask = tokens(ANSWERS)
    best = vqa.rank_answers(images, q_ids, q_mask, a_ids, a_mask, k=len(ANSWERS))
    with torch.no_grad():
        states = vqa.encode_question(images, q_ids, q_mask)
        brute = []
        for q in range(2):
            losses = []
            for a in range(len(ANSWERS)):
                pair = (states[q : q + 1], q_mask[q : q + 1], a_ids[a : a + 1], a_mask[a : a + 1])
                losses.append(answer_loss_by_hand(vqa, *pair).item())
            brute.append(min(range(len(ANSWERS)), key=losses.__getitem__))
    assert best.tolist() == brute
    # With k = 2 the winner must be one of the two answers whose first token is most likely.
    top2 = vqa.rank_answers(images, q_ids, q_mask, a_ids, a_mask, k=2)
    with torch.no_grad():
        start = torch.full((2, 1), T.bos)
        first = vqa.text_decoder(start, torch.ones_like(start), states, q_mask)[:, 0].softmax(-1)
    for q in range(2):
        allowed = first[q, a_ids[:, 1]].topk(2).indices.tolist()
        assert top2[q].item() in allowed


def test_vqa_loss_weights_answers_per_question(vqa: BlipVQA) -> None:
    images = torch.randn(2, 3, CFG.image_size, CFG.image_size)
    q_ids, q_mask = tokens(["what color is it?", "how many?"])
    a_ids, a_mask = tokens(["red", "dark red", "2"])  # question 0 has two answers, question 1 one
    per_question = torch.tensor([2, 1])
    weights = torch.tensor([0.7, 0.3, 1.0])
    loss = vqa(images, q_ids, q_mask, a_ids, a_mask, per_question, weights)
    with torch.no_grad():
        states = vqa.encode_question(images, q_ids, q_mask)
        parts = []
        for a, q in enumerate([0, 0, 1]):
            pair = (states[q : q + 1], q_mask[q : q + 1], a_ids[a : a + 1], a_mask[a : a + 1])
            parts.append(weights[a] * answer_loss_by_hand(vqa, *pair))
    assert loss.item() == pytest.approx((sum(parts) / 2).item(), abs=1e-5)


def test_nlvr_layout_and_init_from_pretrained() -> None:
    torch.manual_seed(0)
    model = BlipNLVR(CFG, T)
    keys = list(model.state_dict())
    half = CFG.text_depth // 2
    for layer in range(CFG.text_depth):
        prefix = f"text_encoder.encoder.layer.{layer}.crossattention."
        assert f"{prefix}self0.query.weight" in keys and f"{prefix}self1.value.bias" in keys
        assert f"{prefix}output.dense0.weight" in keys and f"{prefix}output.dense1.weight" in keys
        assert (f"{prefix}output.merge_layer.weight" in keys) == (layer >= half)
    assert {"cls_head.0.weight", "cls_head.2.weight"} <= set(keys)
    assert not [k for k in keys if re.search(r"crossattention\.(self|output\.dense)\.", k)]

    pretrained = BlipPretrain(CFG, T, queue_size=32).state_dict()
    report = load_official(model, pretrained)
    assert "text_decoder.cls.predictions.bias" in report.dropped
    assert any("merge_layer" in k for k in report.initialised) and "cls_head.0.weight" in report.initialised
    source = pretrained["text_encoder.encoder.layer.0.crossattention.self.query.weight"]
    twin = model.text_encoder.encoder.layer[0].crossattention
    assert torch.equal(twin.self0.query.weight, source) and torch.equal(twin.self1.query.weight, source)
    dense = pretrained["text_encoder.encoder.layer.1.crossattention.output.dense.weight"]
    assert torch.equal(model.text_encoder.encoder.layer[1].crossattention.output.dense1.weight, dense)


def test_nlvr_forward_and_image_order_matters() -> None:
    torch.manual_seed(0)
    model = perturbed(BlipNLVR(CFG, T), 4)
    left, right = torch.randn(2, 2, 3, CFG.image_size, CFG.image_size)
    ids, mask = tokens(["the left image contains a red circle", "both images contain a square"])
    logits = model.logits(left, right, ids, mask)
    assert logits.shape == (2, 2)
    assert not torch.allclose(logits, model.logits(right, left, ids, mask))  # self0 sees left, self1 right
    model.train()
    loss = model(left, right, ids, mask, torch.tensor([1, 0]))
    loss.backward()
    twin = model.text_encoder.encoder.layer[-1].crossattention
    assert twin.self1.key.weight.grad.abs().sum() > 0 and twin.output.merge_layer.weight.grad.abs().sum() > 0
