"""The training engine's parts: schedules, weight-decay groups, checkpoints, non-finite stop, exact data resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from blip.config import load_params
from blip.config.params import DEFAULT_PARAMS
from blip.config.schema import AugmentConfig, PretrainConfig, TrainConfig
from blip.data.loader import DataPosition, make_loader, train_pipeline
from blip.data.transforms import train_transform
from blip.distributed import DistContext
from blip.stages.driver import run_fingerprint
from blip.tracking.runs import StageRun
from blip.training import checkpoints
from blip.training.loop import NonFiniteLossError, Trainer
from blip.training.optim import cosine_lr, param_groups, pretrain_lr
from tests.unit.test_loader import write_pairs

CPU = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def test_pretrain_schedule_is_blips() -> None:
    cfg = PretrainConfig(lr=3e-4, warmup_lr=1e-6, warmup_steps=10, steps_per_epoch=100, epochs=20,
                         lr_decay=0.9, min_lr=1e-4, batch_size=8, queue_size=16)  # fmt: skip
    assert pretrain_lr(cfg, 0) == pytest.approx(1e-6)
    assert pretrain_lr(cfg, 5) == pytest.approx(1e-6 + (3e-4 - 1e-6) * 0.5)
    assert pretrain_lr(cfg, 10) == pytest.approx(3e-4)  # warm-up over: epoch 0 keeps the full lr
    assert pretrain_lr(cfg, 99) == pytest.approx(3e-4)
    assert pretrain_lr(cfg, 100) == pytest.approx(3e-4 * 0.9)  # decays once per epoch
    assert pretrain_lr(cfg, 250) == pytest.approx(3e-4 * 0.81)
    assert pretrain_lr(cfg, 1900) == pytest.approx(1e-4)  # floored at min_lr


def test_cosine_schedule_per_epoch() -> None:
    cfg = TrainConfig(lr=1e-5, min_lr=0.0, epochs=4, steps_per_epoch=10, batch_size=4)
    assert [cosine_lr(cfg, s) for s in (0, 9, 10, 20, 30)] == pytest.approx(
        [1e-5, 1e-5, 1e-5 * (1 + 2**-0.5) / 2, 0.5e-5, 1e-5 * (1 - 2**-0.5) / 2]
    )


def test_weight_decay_exemption() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3))
    model.frozen = nn.Parameter(torch.ones(2), requires_grad=False)
    assert [len(g["params"]) for g in param_groups(model, 0.05, exempt_bias_and_norm=False)] == [4]
    groups = param_groups(model, 0.05, exempt_bias_and_norm=True)
    assert [(len(g["params"]), g["weight_decay"]) for g in groups] == [(1, 0.05), (3, 0.0)]


def test_checkpoints_keep_last_k_and_fall_back_past_corruption(tmp_path: Path) -> None:
    for step in (1, 2, 3, 4):
        checkpoints.save_checkpoint(tmp_path, step, {"step": step, "w": torch.full((3,), float(step))}, keep=3)
    assert [p.name for p in checkpoints.checkpoints(tmp_path)] == ["step-000000002.pt", "step-000000003.pt",
                                                                    "step-000000004.pt"]  # fmt: skip
    assert not list(tmp_path.glob("*.partial")) and not (tmp_path / "step-000000001.pt.sha256").exists()
    state, path = checkpoints.load_latest(tmp_path)
    assert state["step"] == 4 and path.name == "step-000000004.pt"
    newest = tmp_path / "step-000000004.pt"
    newest.write_bytes(newest.read_bytes()[:100])  # truncated, as by a crash mid-copy
    state, path = checkpoints.load_latest(tmp_path)
    assert state["step"] == 3
    third = tmp_path / "step-000000003.pt"
    data = bytearray(third.read_bytes())
    data[-50] ^= 0xFF  # one flipped byte: still the right size, but the checksum catches it
    third.write_bytes(bytes(data))
    assert checkpoints.load_latest(tmp_path)[0]["step"] == 2
    assert checkpoints.load_latest(tmp_path / "none") is None


class _Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.w * x).sum()


def test_non_finite_loss_stops_before_the_update_and_keeps_the_checkpoint(tmp_path: Path) -> None:
    cfg = TrainConfig(epochs=1, steps_per_epoch=10, batch_size=1, checkpoint_every=1, checkpoint_dir=tmp_path,
                      log_every=1, lr=0.1)  # fmt: skip
    trainer = Trainer(cfg, _Toy(), CPU, lambda step: cfg.lr)
    batches = ({"x": torch.tensor([1.0, float("nan") if i == 3 else 1.0])} for i in range(10))
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 3.*step-000000003\.pt"):
        trainer.fit(batches, lambda model, batch, step: {"loss": model(batch["x"])}, StageRun(None), 1)
    assert torch.isfinite(trainer.model.w).all()  # the NaN gradient was never applied
    assert checkpoints.load_latest(tmp_path)[0]["step"] == 3


def test_trainer_state_round_trips(tmp_path: Path) -> None:
    cfg = TrainConfig(epochs=1, steps_per_epoch=6, batch_size=1, checkpoint_every=3, checkpoint_dir=tmp_path, lr=0.1)
    compute = lambda model, batch, step: {"loss": model(batch["x"]) + torch.randn(()) * 0}  # noqa: E731
    first = Trainer(cfg, _Toy(), CPU, lambda step: cfg.lr)
    first.fit(({"x": torch.ones(2) * i} for i in range(6)), compute, StageRun(None), 1)
    resumed = Trainer(cfg, _Toy(), CPU, lambda step: cfg.lr)
    assert resumed.resume_from(tmp_path).name == "step-000000006.pt"
    assert resumed.step == 6 and resumed.position.batches == 6
    assert torch.equal(resumed.model.w, first.model.w)
    assert json.dumps(resumed.history) == json.dumps(first.history)


def test_checkpoint_of_other_settings_is_moved_aside_not_resumed(tmp_path: Path, capsys) -> None:
    params = load_params(DEFAULT_PARAMS, [f"data.shard_root={tmp_path / 'shards'}"])
    write_pairs(tmp_path / "shards" / "web", 4, 4)
    cfg = params.pretrain.model_copy(update={"checkpoint_dir": tmp_path / "ckpt", "splits": ["web"]})
    first = Trainer(cfg, _Toy(), CPU, lambda step: cfg.lr, run_fingerprint(params, cfg))
    first.resume()
    first.step = 5
    first.save()
    same = Trainer(cfg, _Toy(), CPU, lambda step: cfg.lr, run_fingerprint(params, cfg))
    same.resume()
    assert same.step == 5  # same settings and data: resumed
    changed_lr = cfg.model_copy(update={"lr": cfg.lr * 2})
    fresh = Trainer(changed_lr, _Toy(), CPU, lambda step: cfg.lr, run_fingerprint(params, changed_lr))
    fresh.resume()
    assert fresh.step == 0 and not (tmp_path / "ckpt").exists()
    assert checkpoints.load_latest(tmp_path / "ckpt.stale")[0]["step"] == 5  # kept for inspection
    assert "made with other settings or data" in capsys.readouterr().out
    first.save()
    write_pairs(tmp_path / "shards" / "web", 5, 5)  # the same settings on other data: not resumed either
    other_data = Trainer(cfg, _Toy(), CPU, lambda step: cfg.lr, run_fingerprint(params, cfg))
    other_data.resume()
    assert other_data.step == 0


@pytest.mark.parametrize("workers", [0, 2])
def test_training_stream_resumes_exactly(tmp_path: Path, workers: int) -> None:
    urls = write_pairs(tmp_path, 60, 10)
    transform = train_transform(32, AugmentConfig(crop_scale=(0.3, 1.0), hflip=True, randaugment_n=2))

    def stream(position: DataPosition | None) -> iter:
        pipeline = train_pipeline(urls, "pairs", transform, 4, seed=3, shuffle_buffer=8, resume=position)
        return iter(make_loader(pipeline, workers))

    reference = stream(None)
    batches = [next(reference) for _ in range(8)]
    position = DataPosition()
    for batch in batches[:5]:  # 5 batches: not a multiple of 2 workers, so the round robin must be rotated
        position.advance(batch)
    resumed = stream(position)
    for expected in batches[5:]:
        got = next(resumed)
        assert got["key"] == expected["key"] and got["text"] == expected["text"]
        assert torch.equal(got["image"], expected["image"])  # the same random crops and flips


class _Linear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (self.layer(x).squeeze(1) - y).square().mean()


def _train(cfg: TrainConfig, batches: list[dict]) -> Trainer:
    trainer = Trainer(cfg, _Linear(), CPU, lambda step: cfg.lr)
    trainer.fit(iter(batches), lambda model, b, step: {"loss": model(b["x"], b["y"])}, StageRun(None), 1)
    return trainer


def test_gradient_accumulation_equals_one_big_batch(tmp_path: Path) -> None:
    x, y = torch.randn(8, 4, generator=torch.Generator().manual_seed(1)), torch.arange(8.0)
    common = {"epochs": 1, "steps_per_epoch": 3, "lr": 0.05, "checkpoint_dir": tmp_path, "grad_clip": 1.0}
    whole = _train(TrainConfig(batch_size=8, **common), [{"x": x, "y": y}] * 3)
    halves = [{"x": x[:4], "y": y[:4]}, {"x": x[4:], "y": y[4:]}] * 3
    accumulated = _train(TrainConfig(batch_size=8, accumulation=2, **common), halves)
    assert torch.allclose(whole.model.layer.weight, accumulated.model.layer.weight, atol=1e-6)
    assert accumulated.position.batches == 6


def test_bf16_autocast_and_torch_compile_train(tmp_path: Path) -> None:
    x, y = torch.randn(8, 4, generator=torch.Generator().manual_seed(1)), torch.arange(8.0)
    for precision, compile_ in (("bf16", False), ("fp32", True)):
        cfg = TrainConfig(epochs=1, steps_per_epoch=20, batch_size=8, lr=0.3, log_every=5, precision=precision,
                          compile=compile_, checkpoint_dir=tmp_path / precision)  # fmt: skip
        trainer = _train(cfg, [{"x": x, "y": y}] * 20)
        losses = [row["loss"] for row in trainer.history]
        assert losses[-1] < losses[0] / 2, (precision, losses)
        assert trainer.model.layer.weight.dtype == torch.float32  # autocast leaves the master weights in fp32
        saved = checkpoints.load_latest(tmp_path / precision)[0]["model"]
        assert set(saved) == {"layer.weight", "layer.bias"}  # no torch.compile wrapper names in checkpoints
