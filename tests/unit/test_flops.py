"""The analytic pretraining FLOPs (benchmarks/flops.py, used for MFU) against torch's own FLOP counter."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.flops import pretrain_flops_per_sample
from blip.data.tokenizer import load_tokenizer
from blip.models.factory import build_model
from tests.conftest import TINY_BERT


@pytest.mark.parametrize("update", [{}, {"image_size": 96, "text_depth": 3, "vision_depth": 1}])
def test_analytic_pretrain_flops_match_the_counter(update: dict) -> None:
    cfg = TINY_BERT.model_copy(update=update)
    tokenizer = load_tokenizer()
    model = build_model("pretrain", cfg, tokenizer, queue_size=0)
    batch, text_len = 4, 12
    images = torch.randn(batch, 3, cfg.image_size, cfg.image_size)
    ids = torch.randint(1000, 2000, (batch, text_len))
    ids[:, 0] = tokenizer.cls_token_id
    # The math kernel runs attention as matmuls the counter sees (it does not count the fused CPU kernel).
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(images, ids, torch.ones_like(ids), alpha=0.4).loss.backward()
    counted = counter.get_total_flops() / batch
    analytic = pretrain_flops_per_sample(cfg, text_len, global_batch=batch, queue=0)
    assert analytic == pytest.approx(counted, rel=0.02)  # measured: 0.7% and 1.2%
