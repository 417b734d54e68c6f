"""`blip export-onnx`: onnxruntime's outputs equal ours (1e-4), captions identical, dynamic batch and length."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from blip.cli import main as blip_main
from blip.data.scene import render, sample_scene
from blip.data.tokenizer import load_tokenizer
from blip.data.transforms import eval_transform
from blip.models.checkpoint import save_weights
from blip.models.factory import build_model
from blip.models.generation import GenerationConfig
from blip.models.med import KVCache
from blip.onnx.export import kv_names
from blip.onnx.runner import OnnxCaptioner, OnnxRetrieval, load_onnx
from tests.conftest import TINY_BERT

TOKENIZER = load_tokenizer()
TOL = 1e-4


def scenes(count: int, seed: int = 0) -> torch.Tensor:
    rng, transform = random.Random(seed), eval_transform(TINY_BERT.image_size)
    return torch.stack([transform(render(sample_scene(rng, 2), 96)) for _ in range(count)])


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[torch.nn.Module, Path]]:
    root, out = tmp_path_factory.mktemp("onnx"), {}
    for task in ("caption", "retrieval"):
        torch.manual_seed(0)
        model = build_model(task, TINY_BERT, TOKENIZER, queue_size=16).eval()
        weights = save_weights(model, root / f"{task}.safetensors", "bert-base-uncased-offline")
        assert blip_main(["export-onnx", "--task", task, "--weights", str(weights), "--out", str(root / task)]) == 0
        out[task] = (model, root / task)
    return out


def test_captioner_graphs_match_torch_and_generate_the_same_captions(exported: dict) -> None:
    model, folder = exported["caption"]
    runner = load_onnx(folder)
    assert isinstance(runner, OnnxCaptioner) and runner.tokens == model.tokens
    images = scenes(5)  # a batch size the export never saw
    with torch.inference_mode():
        embeds = model.visual_encoder(images)
        (onnx_embeds,) = runner.run("vision", images=images.numpy())
        assert np.abs(onnx_embeds - embeds.numpy()).max() < TOL
        # The prompt, then four tokens one at a time: logits and the growing cache within 1e-4 at each step.
        cache, ids = KVCache(), model.prompt[None].expand(5, -1)
        logits = model.text_decoder.next_token_logits(ids, embeds, None, cache)
        onnx_logits, *kv = runner.run("decoder_prefill", input_ids=ids.numpy(), image_embeds=onnx_embeds)
        past, cross = kv[: 2 * runner.layers], kv[2 * runner.layers :]
        for _ in range(4):
            assert np.abs(onnx_logits - logits.numpy()).max() < TOL
            token = logits.argmax(-1, keepdim=True)
            logits = model.text_decoder.next_token_logits(token, embeds, None, cache)
            feed = dict(
                zip(kv_names("past", runner.layers) + kv_names("cross", runner.layers), past + cross, strict=True)
            )
            onnx_logits, *past = runner.run("decoder_step", input_ids=token.numpy(), **feed)
        assert past[0].shape[2] == ids.shape[1] + 4
        assert np.abs(past[0] - cache.self_kv[0][0].numpy()).max() < TOL
    for config in (
        GenerationConfig("greedy"),
        GenerationConfig("beam", num_beams=3),
        GenerationConfig("beam", num_beams=2, max_length=12, min_length=8, repetition_penalty=1.5),
    ):
        assert runner.generate(images, config) == model.generate(images, config), config
    nucleus = GenerationConfig("nucleus", top_p=0.9)
    same_seed = [m.generate(images, nucleus, torch.Generator().manual_seed(3)) for m in (runner, model)]
    assert same_seed[0] == same_seed[1]


def test_retrieval_graphs_match_torch_at_any_batch_and_length(exported: dict) -> None:
    model, folder = exported["retrieval"]
    runner = load_onnx(folder)
    assert isinstance(runner, OnnxRetrieval)
    for count, texts in ((3, ["a red circle", "two blue squares to the left of a small green triangle", "a"]),
                         (1, ["a large white diamond at the top"])):  # fmt: skip
        images = scenes(count, seed=count)
        tokens = runner.tokenizer(texts, padding="longest", return_tensors="pt")
        with torch.inference_mode():
            probability, similarity = model.score_pairs(images, tokens.input_ids, tokens.attention_mask)
            embeds, feat = model.image_features(images)
            text_feat = model.text_features(tokens.input_ids, tokens.attention_mask)
        onnx_probability, onnx_similarity = runner.score_pairs(images, tokens.input_ids, tokens.attention_mask)
        onnx_embeds, onnx_feat = runner.image_features(images)
        for ours, theirs in (
            (probability, onnx_probability),
            (similarity, onnx_similarity),
            (embeds, onnx_embeds),
            (feat, onnx_feat),
            (text_feat, runner.text_features(tokens.input_ids, tokens.attention_mask)),
        ):
            assert np.abs(theirs - ours.numpy()).max() < TOL


def test_caption_and_itm_commands_run_the_exported_graphs(exported: dict, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    path = tmp_path / "scene.png"
    render(sample_scene(random.Random(5), 2), 96).save(path)
    model, folder = exported["caption"]
    assert blip_main(["caption", "--onnx", str(folder), "--method", "greedy", str(path)]) == 0
    (line,) = capsys.readouterr().out.strip().splitlines()
    expected = model.generate(eval_transform(TINY_BERT.image_size)(render(sample_scene(random.Random(5), 2), 96))[None],
                              GenerationConfig("greedy"))  # fmt: skip
    assert line == f"{path}\t{TOKENIZER.decode(expected[0], skip_special_tokens=True)}"
    assert blip_main(["itm", "--onnx", str(exported["retrieval"][1]), str(path), "a red circle", "a cat"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 3
    with pytest.raises(SystemExit, match="holds a caption model, not a retrieval one"):
        blip_main(["itm", "--onnx", str(folder), str(path), "a red circle"])
