"""Our models against `transformers`' BLIP port on the same (random) weights, exported by `export_hf`.

The port was verified against the official checkpoints, so equality here is our best correctness check.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval

from blip.data.tokenizer import BERT_SPECIAL_TOKENS as T
from blip.data.tokenizer import load_tokenizer
from blip.models.caption import PROMPT, BlipCaptioner
from blip.models.export_hf import export_hf
from blip.models.generation import GenerationConfig
from blip.models.retrieval import BlipRetrieval
from tests.conftest import TINY_BERT

TOKENIZER = load_tokenizer()
CFG = TINY_BERT.model_copy(update={"text_dropout": 0.0})


def perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights away from the init (LayerNorms and biases too), in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    return model.eval()


def hf_ids(rows: list[list[int]], prompt_length: int) -> list[list[int]]:
    out = []
    for row in rows:
        row = row[prompt_length:]
        out.append(row[: row.index(T.sep)] if T.sep in row else [t for t in row if t != T.pad])
    return out


@pytest.fixture(scope="module")
def captioners(tmp_path_factory: pytest.TempPathFactory) -> tuple[BlipCaptioner, BlipForConditionalGeneration]:
    torch.manual_seed(0)
    prompt_ids = TOKENIZER(PROMPT.strip(), add_special_tokens=False).input_ids
    ours = perturbed(BlipCaptioner(CFG, T, prompt_ids), 1)
    with torch.no_grad():  # make the end token likely, so beams finish at different lengths
        ours.text_decoder.cls.predictions.bias[T.sep] += 1.5
    folder = export_hf(ours.state_dict(), CFG, TOKENIZER, "caption", tmp_path_factory.mktemp("hf") / "caption")
    return ours, BlipForConditionalGeneration.from_pretrained(folder).eval()


def test_caption_logits_match(captioners: tuple) -> None:
    ours, theirs = captioners
    images = torch.randn(3, 3, CFG.image_size, CFG.image_size)
    texts = [PROMPT + "a red circle on the left", PROMPT + "two shapes", PROMPT + "x"]
    batch = TOKENIZER(texts, return_tensors="pt", padding=True)
    ids = batch.input_ids.clone()
    ids[:, 0] = T.bos
    with torch.no_grad():
        mine = ours.logits(images, batch.input_ids, batch.attention_mask)
        reference = theirs(pixel_values=images, input_ids=ids, attention_mask=batch.attention_mask).logits
    valid = batch.attention_mask.bool()
    assert (mine - reference)[valid].abs().max() <= 1e-4


@pytest.mark.parametrize("method", ["greedy", "beam"])
@pytest.mark.parametrize("repetition_penalty", [1.0, 1.3])
def test_generated_captions_match(captioners: tuple, method: str, repetition_penalty: float) -> None:
    ours, theirs = captioners
    images = torch.randn(4, 3, CFG.image_size, CFG.image_size, generator=torch.Generator().manual_seed(5))
    config = GenerationConfig(method=method, num_beams=3, max_length=20, min_length=6,
                              repetition_penalty=repetition_penalty)  # fmt: skip
    mine = ours.generate(images, config)
    prompt = TOKENIZER([PROMPT.strip()] * 4, return_tensors="pt").input_ids
    reference = theirs.generate(
        pixel_values=images, input_ids=prompt, max_length=20, min_length=6, do_sample=False,
        num_beams=3 if method == "beam" else 1, repetition_penalty=repetition_penalty,
    )  # fmt: skip
    assert mine == hf_ids(reference.tolist(), ours.prompt_length)
    lengths = {len(c) for c in mine}
    assert min(lengths) >= 6 - ours.prompt_length and max(lengths) <= 20 - ours.prompt_length
    if method == "beam":
        assert len(lengths) > 1  # some beams ended early: the finished-hypothesis path is exercised


def test_itm_and_itc_match(tmp_path: Path) -> None:
    torch.manual_seed(0)
    ours = perturbed(BlipRetrieval(CFG, T, queue_size=64), 2)
    theirs = BlipForImageTextRetrieval.from_pretrained(
        export_hf(ours.state_dict(), CFG, TOKENIZER, "retrieval", tmp_path / "retrieval")
    ).eval()
    images = torch.randn(3, 3, CFG.image_size, CFG.image_size)
    batch = TOKENIZER(["a red circle", "two shapes on the left of a square", "x"], return_tensors="pt", padding=True)
    enc_ids = batch.input_ids.clone()
    enc_ids[:, 0] = T.enc
    with torch.no_grad():
        embeds, image_feat = ours.image_features(images)
        itm = ours.itm_logits(embeds, batch.input_ids, batch.attention_mask)
        itm_ref = theirs(pixel_values=images, input_ids=enc_ids, attention_mask=batch.attention_mask).itm_score
        sims = image_feat @ ours.text_features(batch.input_ids, batch.attention_mask).T
        sims_ref = theirs(
            pixel_values=images, input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_itm_head=False
        ).itm_score
        probability, similarity = ours.score_pairs(images, batch.input_ids, batch.attention_mask)
    assert (itm - itm_ref).abs().max() <= 1e-4
    assert (sims - sims_ref).abs().max() <= 1e-4
    assert torch.allclose(probability, itm_ref.softmax(-1)[:, 1], atol=1e-5)
    assert torch.allclose(similarity, sims_ref.diagonal(), atol=1e-5)
