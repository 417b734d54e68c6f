"""`model.patch_embed: conv`, the optional convolutional stem: the same token grid as the ViT's patch layer,
saved and loaded like any weights, refused by the transformers export (whose BLIP has the linear layer only)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from blip.config.schema import ModelConfig
from blip.data.tokenizer import load_tokenizer
from blip.models.checkpoint import save_weights
from blip.models.export_hf import export_hf
from blip.models.factory import build_model, load_trained
from blip.models.vit import create_vit
from tests.conftest import TINY_BERT

CONV = TINY_BERT.model_copy(update={"patch_embed": "conv"})
TOKENIZER = load_tokenizer()


@pytest.mark.parametrize("patch_size", [8, 16, 32])
def test_conv_stem_gives_the_linear_layers_token_grid(patch_size: int) -> None:
    linear = ModelConfig(image_size=64, patch_size=patch_size, vision_width=32, vision_heads=2)
    conv = linear.model_copy(update={"patch_embed": "conv"})
    images = torch.randn(2, 3, 64, 64)
    tokens = create_vit(conv).eval()(images)
    assert tokens.shape == create_vit(linear).eval()(images).shape == (2, 1 + (64 // patch_size) ** 2, 32)
    convs = [m for m in create_vit(conv).patch_embed.modules() if isinstance(m, torch.nn.Conv2d)]
    # stride-2 3x3 convolutions down to the patch grid, then the 1x1 projection to the width
    assert [c.stride for c in convs[:-1]] == [(2, 2)] * (patch_size.bit_length() - 1)
    assert convs[-1].kernel_size == (1, 1) and convs[-1].out_channels == 32


def test_conv_stem_needs_a_power_of_two_patch() -> None:
    with pytest.raises(ValidationError, match="patch_size 12 must be a power of two"):
        ModelConfig(image_size=48, patch_size=12, patch_embed="conv")


def test_conv_stem_weights_round_trip_and_refuse_transformers_export(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model("caption", CONV, TOKENIZER).eval()
    path = save_weights(model, tmp_path / "caption.safetensors", "bert-base-uncased-offline")
    loaded, _ = load_trained("caption", path, None, None)
    images = torch.randn(2, 3, CONV.image_size, CONV.image_size)
    with torch.no_grad():  # eval mode: BatchNorm's running statistics travel with the weights
        assert torch.equal(model.visual_encoder(images), loaded.eval().visual_encoder(images))
    assert loaded.model_config.patch_embed == "conv"
    with pytest.raises(ValueError, match="linear patch layer only"):
        export_hf(model.state_dict(), CONV, TOKENIZER, "caption", tmp_path / "hf")
