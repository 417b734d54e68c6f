"""Model FLOPs of one BLIP pretraining sample (ITC + ITM + LM), counted analytically from the config.

A multiply-add is 2 FLOPs. Training costs 3x the forward (backward = 2x) for every pass that has gradients;
the momentum encoders only run forward. Per sample: one image through the ViT, its caption through the text
encoder (ITC), three image-text pairs through the image-grounded encoder (ITM: the positive and two hard
negatives), one through the decoder (LM) with its vocabulary head on all but the last position, and the ITC
similarities against the global batch and the queue. `tests/unit/test_flops.py` checks the count against torch's
FlopCounterMode.
"""

from __future__ import annotations

from blip.config.schema import ModelConfig


def transformer_layer(tokens: int, width: int, ffn: int, context: int = 0, context_width: int = 0) -> int:
    """Forward FLOPs of one pre/post-norm transformer layer over `tokens`, cross-attending to `context` tokens."""
    flops = 2 * tokens * (4 * width * width + 2 * width * ffn)  # q, k, v, out projections; the two FFN matmuls
    flops += 4 * tokens * tokens * width  # scores and weighted sum
    if context:
        flops += 2 * tokens * 2 * width * width  # cross q and out projections
        flops += 2 * context * 2 * context_width * width  # cross k and v projections of the image tokens
        flops += 4 * tokens * context * width
    return flops


def vit_forward(cfg: ModelConfig) -> int:
    patches = (cfg.image_size // cfg.patch_size) ** 2
    tokens = patches + 1
    embed = 2 * patches * 3 * cfg.patch_size**2 * cfg.vision_width
    return embed + cfg.vision_depth * transformer_layer(tokens, cfg.vision_width, 4 * cfg.vision_width)


def text_forward(cfg: ModelConfig, text_len: int, cross: bool) -> int:
    image_tokens = (cfg.image_size // cfg.patch_size) ** 2 + 1
    ffn = cfg.text_intermediate or 4 * cfg.text_width
    layer = transformer_layer(text_len, cfg.text_width, ffn, image_tokens if cross else 0, cfg.vision_width)
    return cfg.text_depth * layer


def pretrain_flops_per_sample(cfg: ModelConfig, text_len: int, global_batch: int, queue: int) -> int:
    vocab = cfg.vocab_size or 30524
    # The head runs on every position but the last (it would predict past the end).
    lm_head = 2 * (text_len - 1) * (cfg.text_width * cfg.text_width + cfg.text_width * vocab)
    itc = 2 * 2 * (global_batch + queue) * cfg.embed_dim  # image->text and text->image similarities
    trained = (vit_forward(cfg) + text_forward(cfg, text_len, cross=False) + 3 * text_forward(cfg, text_len, True)
               + text_forward(cfg, text_len, True) + lm_head + itc)  # fmt: skip
    momentum = vit_forward(cfg) + text_forward(cfg, text_len, cross=False)
    return 3 * trained + momentum
