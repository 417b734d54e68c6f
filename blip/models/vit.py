"""The image encoder: a timm VisionTransformer (patch 16, qkv bias, LayerNorm eps 1e-6) returning all tokens.

Its parameter names are exactly those of BLIP's `visual_encoder` (`cls_token`, `pos_embed`, `patch_embed.proj`,
`blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}`, `norm`), so official checkpoints load unchanged.
`patch_embed: conv` swaps the patchify layer for timm's convolutional stem (Xiao et al. 2021, "Early Convolutions
Help Transformers See Better"), which learns small shapes faster in a tiny ViT (see `conv_patch_embed`).
"""

from __future__ import annotations

from functools import partial

import torch
from timm.layers import HybridEmbed, resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer
from timm.models.vision_transformer_hybrid import ConvStem
from torch import nn
from torch.utils.checkpoint import checkpoint

from blip.config.schema import ModelConfig


class ViT(VisionTransformer):
    """timm's ViT whose forward returns every token ([CLS] first), with checkpointing of the last N blocks."""

    def __init__(self, image_size: int, patch_size: int, width: int, depth: int, heads: int, drop_path: float,
                 grad_ckpt_layers: int = 0, eps: float = 1e-6) -> None:  # fmt: skip
        super().__init__(
            img_size=image_size,
            patch_size=patch_size,
            embed_dim=width,
            depth=depth,
            num_heads=heads,
            mlp_ratio=4.0,
            qkv_bias=True,
            norm_layer=partial(nn.LayerNorm, eps=eps),
            drop_path_rate=drop_path,
            num_classes=0,
        )
        self.grad_ckpt_layers = grad_ckpt_layers

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(images))))
        # BLIP checkpoints only the last N blocks: recompute costs time, so it is spent only where memory is short.
        first_checkpointed = len(self.blocks) - self.grad_ckpt_layers if self.training else len(self.blocks)
        for index, block in enumerate(self.blocks):
            x = checkpoint(block, x, use_reentrant=False) if index >= first_checkpointed else block(x)
        return self.norm(x)


def create_vit(cfg: ModelConfig) -> ViT:
    vit = ViT(
        cfg.image_size,
        cfg.patch_size,
        cfg.vision_width,
        cfg.vision_depth,
        cfg.vision_heads,
        cfg.drop_path,
        cfg.grad_ckpt_layers,
        cfg.vision_layer_norm_eps,
    )
    if cfg.patch_embed == "conv":
        vit.patch_embed = conv_patch_embed(cfg)
    return vit


def conv_patch_embed(cfg: ModelConfig) -> HybridEmbed:
    """Stride-2 3x3 convolutions (BatchNorm, GELU) down to one token per patch_size square, then a 1x1 projection:
    the same token grid as the linear patch layer. Measured on the built-in world's lone shapes (a ViT of the tiny
    preset trained 300 steps to name the shape): 83% right with this stem, 51% with the linear one."""
    convs = cfg.patch_size.bit_length() - 1  # the schema checks patch_size is a power of two for this stem
    width = cfg.vision_width
    channels = (*(max(width >> (convs - 2 - i), 8) for i in range(convs - 2)), width, width)  # 24, 48, 96, 96
    stem = ConvStem(depth=convs, channels=channels, stride=(2,) * convs, kernel_size=3, padding=1, act_layer=nn.GELU)
    return HybridEmbed(stem, img_size=cfg.image_size, patch_size=1, embed_dim=width)


def resize_pos_embed(pos_embed: torch.Tensor, num_patches: int) -> torch.Tensor:
    """Bicubic resize of a [1, 1 + n, D] position embedding to `num_patches` patches (BLIP: no antialiasing)."""
    old = pos_embed.shape[1] - 1
    if old == num_patches:
        return pos_embed
    old_side, new_side = round(old**0.5), round(num_patches**0.5)
    if old_side**2 != old or new_side**2 != num_patches:
        raise ValueError(f"position embeddings must form a square grid: {old} -> {num_patches} patches")
    return resample_abs_pos_embed(
        pos_embed, [new_side, new_side], [old_side, old_side], num_prefix_tokens=1, antialias=False
    )


def timm_state(name: str) -> dict[str, torch.Tensor]:
    """Pretrained weights of a timm model in the local cache (offline, hub downloads fail)."""
    import timm

    try:
        return timm.create_model(name, pretrained=True, num_classes=0).state_dict()
    except Exception as exc:  # timm raises many kinds (hub, HTTP, RuntimeError) when weights are unavailable
        raise RuntimeError(
            f"model.vit_init={name!r}: could not load timm weights ({type(exc).__name__}: {exc}). Offline, "
            "download the weights elsewhere and set model.vit_init to the file (.safetensors or .pth)."
        ) from exc


def load_vit_state(vit: ViT, state: dict[str, torch.Tensor], source: str) -> None:
    """Initialise from a ViT's weights, bare (timm) or under `visual_encoder.` (BLIP); other keys are ignored."""
    state = {k.removeprefix("visual_encoder."): v for k, v in state.items()}
    if "pos_embed" in state:
        state["pos_embed"] = resize_pos_embed(state["pos_embed"], vit.patch_embed.num_patches)
    # strict=False: classifier heads, text towers and the like in the file are not part of the image encoder.
    missing, _ = vit.load_state_dict(state, strict=False)
    if missing:
        raise ValueError(f"model.vit_init={source!r}: weights lack {len(missing)} ViT keys, e.g. {missing[:3]}")
