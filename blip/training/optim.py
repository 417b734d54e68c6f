"""AdamW and BLIP's learning-rate schedules."""

from __future__ import annotations

import math

import torch
from torch import nn

from blip.config.schema import PretrainConfig, TrainConfig


def param_groups(model: nn.Module, weight_decay: float, exempt_bias_and_norm: bool) -> list[dict]:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue  # momentum encoders follow by EMA, not by gradient
        exempt = exempt_bias_and_norm and (param.ndim <= 1 or name.endswith(".bias") or name == "temp")
        (no_decay if exempt else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    groups = param_groups(model, cfg.weight_decay, cfg.exempt_bias_and_norm)
    # The fused kernel: one launch for all parameters on GPU; on CPU 8x faster than the default per-tensor loop
    # (1.8 vs 15.4 ms a step for the tiny captioner, whose 30k x 96 word embeddings dominate).
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)


def pretrain_lr(cfg: PretrainConfig, step: int) -> float:
    """BLIP pretraining: linear warm-up from warmup_lr in the first epoch, then lr * decay**epoch, floored."""
    epoch = step // cfg.steps_per_epoch
    if epoch == 0 and step < cfg.warmup_steps:
        return cfg.warmup_lr + (cfg.lr - cfg.warmup_lr) * step / cfg.warmup_steps
    return max(cfg.min_lr, cfg.lr * cfg.lr_decay**epoch)


def cosine_lr(cfg: TrainConfig, step: int) -> float:
    """BLIP fine-tuning: cosine from lr to min_lr over the epochs, set once per epoch."""
    epoch = step // cfg.steps_per_epoch
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * epoch / cfg.epochs))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
