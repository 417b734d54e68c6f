"""Official-layout checkpoints: key-for-key loading, position-embedding resizing, refusal of unsafe pickles."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed

from blip.data.tokenizer import BERT_SPECIAL_TOKENS as T
from blip.models.caption import BlipCaptioner
from blip.models.checkpoint import UnsafeCheckpointError, read_state_dict
from blip.models.factory import load_official
from blip.models.pretrain import BlipPretrain
from blip.models.retrieval import BlipRetrieval
from tests.conftest import TINY_BERT

CFG = TINY_BERT

# The official BLIP_Pretrain key layout (BLIP-REFERENCE.md), written out by hand: <N> = layer index.
VIT = [r"cls_token", r"pos_embed", r"patch_embed\.proj\.(weight|bias)", r"norm\.(weight|bias)",
       r"blocks\.<N>\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)"]  # fmt: skip
BERT = [
    r"embeddings\.(word_embeddings\.weight|position_embeddings\.weight|LayerNorm\.(weight|bias))",
    r"encoder\.layer\.<N>\.(attention|crossattention)\.self\.(query|key|value)\.(weight|bias)",
    r"encoder\.layer\.<N>\.(attention|crossattention)\.output\.(dense|LayerNorm)\.(weight|bias)",
    r"encoder\.layer\.<N>\.intermediate\.dense\.(weight|bias)",
    r"encoder\.layer\.<N>\.output\.(dense|LayerNorm)\.(weight|bias)",
]
LM_HEAD = [r"cls\.predictions\.(bias|decoder\.weight|transform\.(dense|LayerNorm)\.(weight|bias))"]
HEADS = [r"(vision_proj|text_proj|itm_head)(_m)?\.(weight|bias)", r"temp", r"image_queue", r"text_queue",
         r"queue_ptr"]  # fmt: skip
OFFICIAL = re.compile(
    "^("
    + "|".join(
        [*(rf"visual_encoder(_m)?\.{p}" for p in VIT), *(rf"text_encoder(_m)?\.{p}" for p in BERT),
         *(rf"text_decoder\.bert\.{p}" for p in BERT), *(rf"text_decoder\.{p}" for p in LM_HEAD), *HEADS]
    ).replace("<N>", r"\d+")
    + ")$"
)  # fmt: skip


def official_pretrain_state(image_size: int = CFG.image_size) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = BlipPretrain(CFG.model_copy(update={"image_size": image_size}), T, queue_size=32)
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_our_keys_are_exactly_the_official_layout() -> None:
    state = official_pretrain_state()
    assert all(OFFICIAL.match(k) for k in state), [k for k in state if not OFFICIAL.match(k)]
    needed = ["visual_encoder.blocks.1.attn.qkv.weight", "text_decoder.cls.predictions.bias", "image_queue",
              "text_encoder_m.encoder.layer.1.crossattention.self.key.weight", "queue_ptr", "temp"]  # fmt: skip
    assert set(needed) <= set(state)


@pytest.mark.parametrize("wrap", [True, False])
def test_official_file_loads_into_each_model(tmp_path: Path, wrap: bool) -> None:
    state = official_pretrain_state()
    path = tmp_path / "model_base.pth"
    torch.save({"model": state, "epoch": 3} if wrap else state, path)
    loaded = read_state_dict(path)
    pretrain = BlipPretrain(CFG, T, queue_size=32)
    report = load_official(pretrain, loaded)
    assert report.dropped == [] and report.initialised == [] and report.resized == []
    assert torch.equal(pretrain.text_decoder.bert.encoder.layer[0].attention.self.query.weight,
                       state["text_decoder.bert.encoder.layer.0.attention.self.query.weight"])  # fmt: skip

    captioner = BlipCaptioner(CFG, T, [1037, 3861, 1997])
    report = load_official(captioner, loaded)
    dropped_parts = {k.split(".")[0] for k in report.dropped}
    assert dropped_parts == {"text_encoder", "text_encoder_m", "visual_encoder_m", "vision_proj", "vision_proj_m",
                             "text_proj", "text_proj_m", "itm_head", "temp", "image_queue", "text_queue",
                             "queue_ptr"}  # fmt: skip
    assert torch.equal(
        captioner.visual_encoder.blocks[0].mlp.fc1.weight, state["visual_encoder.blocks.0.mlp.fc1.weight"]
    )

    retrieval = BlipRetrieval(CFG, T, queue_size=32)
    report = load_official(retrieval, loaded)
    assert {k.split(".")[0] for k in report.dropped} == {"text_decoder", "queue_ptr"}
    assert report.initialised == ["idx_queue", "ptr_queue"]  # retrieval-only buffers keep their fresh values


def test_position_embeddings_are_interpolated(tmp_path: Path) -> None:
    state = official_pretrain_state(image_size=32)  # 2x2 patches
    big = BlipPretrain(CFG.model_copy(update={"image_size": 64}), T, queue_size=32)  # 4x4 patches
    report = load_official(big, state)
    assert report.resized == ["visual_encoder.pos_embed", "visual_encoder_m.pos_embed"]
    expected = resample_abs_pos_embed(state["visual_encoder.pos_embed"], [4, 4], [2, 2], antialias=False)
    assert big.visual_encoder.pos_embed.shape == (1, 17, CFG.vision_width)
    assert torch.allclose(big.visual_encoder.pos_embed, expected)
    assert torch.equal(big.visual_encoder.pos_embed[:, 0], state["visual_encoder.pos_embed"][:, 0])  # [CLS] kept


def test_wrong_architecture_is_refused() -> None:
    state = official_pretrain_state()
    state["text_encoder.encoder.layer.0.attention.self.query.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"text_encoder\.encoder\.layer\.0\.attention\.self\.query\.weight: shape"):
        load_official(BlipRetrieval(CFG, T, 32), state)
    state = official_pretrain_state()
    del state["visual_encoder.blocks.0.norm1.weight"]
    with pytest.raises(KeyError, match="lacks 1 of this model's weights"):
        load_official(BlipCaptioner(CFG, T, [1037]), state)
    state = official_pretrain_state()
    state["text_encoder.encoder.layer.7.output.dense.weight"] = torch.zeros(1)
    with pytest.raises(KeyError, match="another architecture"):
        load_official(BlipRetrieval(CFG, T, 32), state)


class _Exploit:
    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {os.environ['BLIP_TEST_MARKER']}",))


def test_untrusted_pickle_with_code_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "pwned"
    monkeypatch.setenv("BLIP_TEST_MARKER", str(marker))
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "payload": _Exploit()}, path)
    with pytest.raises(UnsafeCheckpointError, match="refused to load"):
        read_state_dict(path)
    assert not marker.exists()


def test_safetensors_and_bad_files(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    save_file({"visual_encoder.cls_token": torch.ones(1, 1, 4)}, str(path))
    assert read_state_dict(path)["visual_encoder.cls_token"].shape == (1, 1, 4)
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        read_state_dict(tmp_path / "nope.pth")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="expected a state dict"):
        read_state_dict(tmp_path / "list.pth")
