"""The training loop: AdamW steps with accumulation, autocast, clipping, logging, checkpoints and exact resume.

A stage supplies the model, a batch stream and `compute(model, batch, step) -> {"loss": ..., other losses}`;
the `Trainer` does the rest the same way for pretraining and every fine-tune.
"""

from __future__ import annotations

import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from blip.config.schema import TrainConfig
from blip.data.loader import DataPosition
from blip.distributed import DistContext, all_true, barrier, mean_over_ranks
from blip.tracking.runs import StageRun
from blip.training import checkpoints
from blip.training.optim import build_optimizer, set_lr

Compute = Callable[[nn.Module, dict, int], dict[str, torch.Tensor]]


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or infinite; training stopped before the bad update, the last checkpoint is intact."""


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    if cfg.precision == "fp32" or (cfg.precision == "auto" and device.type != "cuda"):
        return None
    return torch.float16 if cfg.precision == "fp16" else torch.bfloat16


class Trainer:
    def __init__(self, cfg: TrainConfig, model: nn.Module, ctx: DistContext, lr_at: Callable[[int], float],
                 fingerprint: str = "") -> None:  # fmt: skip
        """`fingerprint`: of the run's settings and data; a checkpoint made for another one is never resumed."""
        self.cfg, self.ctx, self.lr_at = cfg, ctx, lr_at
        self.model = model.to(ctx.device)
        self.optimizer = build_optimizer(self.model, cfg, ctx.device)
        self.dtype = autocast_dtype(cfg, ctx.device)
        self.scaler = torch.amp.GradScaler(enabled=self.dtype == torch.float16)
        wrapped: nn.Module = self.model
        if ctx.distributed:
            # Queues are updated identically on every rank from gathered features: no buffer broadcast needed.
            ids = [ctx.local_rank] if ctx.device.type == "cuda" else None
            wrapped = DistributedDataParallel(self.model, device_ids=ids, forward_sync_buffers=False)
        self.ddp = wrapped
        self.forward_model = torch.compile(wrapped) if cfg.compile else wrapped
        self.step = 0
        self.position = DataPosition()
        self.run_id: str | None = None
        self.fingerprint = fingerprint
        self.history: list[dict[str, float]] = []
        self.skipped_samples = 0  # corrupt samples the loader dropped (this rank)
        self.truncated_shards: dict[str, str] = {}  # shard -> what the loader found (this rank)

    # ------------------------------------------------------------------ state
    def state(self) -> dict[str, Any]:
        rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng,
            "data": {"batches": self.position.batches, "samples": dict(self.position.samples)},
            "history": self.history,
            "mlflow_run_id": self.run_id,
            "fingerprint": self.fingerprint,
        }

    def restore(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self.step = state["step"]
        self.position = DataPosition(state["data"]["batches"], dict(state["data"]["samples"]))
        self.history = list(state["history"])
        self.run_id = state["mlflow_run_id"]

    def resume_from(self, folder: Path) -> Path | Literal["stale"] | None:
        """The checkpoint resumed from; "stale" when the newest one was made for another `fingerprint`."""
        found = checkpoints.load_latest(folder)
        if found is None:
            return None
        if found[0].get("fingerprint") != self.fingerprint:
            return "stale"
        self.restore(found[0])
        return found[1]

    def resume(self) -> None:
        """With `resume: auto`, continue from the newest valid checkpoint of this very run; one made for other
        settings or data is moved aside to `<checkpoint_dir>.stale` (kept for inspection, never resumed)."""
        if self.cfg.resume != "auto":
            return
        folder, name = self.cfg.checkpoint_dir, self.cfg.name
        found = self.resume_from(folder)
        if found == "stale":
            stale = folder.with_name(folder.name + ".stale")
            if self.ctx.is_main:
                shutil.rmtree(stale, ignore_errors=True)
                os.replace(folder, stale)
                print(f"{name}: checkpoints in {folder} were made with other settings or data: moved to {stale}, "
                      "starting fresh")  # fmt: skip
            barrier(self.ctx)
        elif found and self.ctx.is_main:
            print(f"{name}: resuming from {found} (step {self.step})")

    def save(self) -> Path | None:
        if not self.ctx.is_main:
            return None
        return checkpoints.save_checkpoint(self.cfg.checkpoint_dir, self.step, self.state(), self.cfg.keep_checkpoints)

    # ------------------------------------------------------------------ loop
    def _note_data(self, batch: dict) -> None:
        self.skipped_samples += batch.get("skipped", 0)
        for shard, samples, reason in batch.get("truncated", []):
            if shard not in self.truncated_shards:
                self.truncated_shards[shard] = f"{reason} after {samples} samples"
                tqdm.write(f"warning: training shard {shard} is truncated ({reason} after {samples} samples): "
                           "only the samples before the cut are trained on")  # fmt: skip

    def _micro_step(self, batch: dict, compute: Compute, sync: bool) -> dict[str, torch.Tensor]:
        autocast = torch.autocast(self.ctx.device.type, dtype=self.dtype) if self.dtype is not None else nullcontext()
        no_sync = nullcontext() if sync or not self.ctx.distributed else self.ddp.no_sync()
        with no_sync:
            with autocast:
                losses = compute(self.forward_model, batch, self.step)
            self.scaler.scale(losses["loss"] / self.cfg.accumulation).backward()
        return {k: v.detach() for k, v in losses.items()}

    def fit(self, batches: Iterable[dict], compute: Compute, run: StageRun, samples_per_step: int) -> None:
        cfg = self.cfg
        self.run_id = self.run_id or run.run_id  # a resumed run continues its MLflow run
        stream = iter(batches)
        bar = tqdm(total=cfg.total_steps, initial=self.step, desc="train", unit="step",
                   disable=not self.ctx.is_main, mininterval=1.0)  # fmt: skip
        window: list[dict[str, float]] = []
        started = time.perf_counter()
        self.model.train()
        while self.step < cfg.total_steps:
            lr = self.lr_at(self.step)
            set_lr(self.optimizer, lr)
            totals: dict[str, float] = {}
            for micro in range(cfg.accumulation):
                with torch.random.fork_rng(devices=[]):
                    # A DataLoader draws its workers' seed from the global RNG when it starts (on the first
                    # batch): keep that out of the model's random stream, or a resumed run would diverge.
                    batch = next(stream)
                self._note_data(batch)
                losses = self._micro_step(batch, compute, sync=micro == cfg.accumulation - 1)
                self.position.advance(batch)
                values = torch.stack([v.float() for v in losses.values()]).tolist()  # one device-to-host copy
                for name, value in zip(losses, values, strict=True):
                    totals[name] = totals.get(name, 0.0) + value / cfg.accumulation
            if not all_true(math.isfinite(totals["loss"]), self.ctx):
                last = checkpoints.checkpoints(cfg.checkpoint_dir)
                raise NonFiniteLossError(
                    f"non-finite loss at step {self.step} (loss={totals['loss']}); stopped before applying it. "
                    f"Last good checkpoint: {last[-1] if last else 'none'}. Lower the lr or check the data."
                )
            self.scaler.unscale_(self.optimizer)
            if cfg.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            bar.update(1)
            window.append(totals)
            if self.step % cfg.log_every == 0 or self.step == cfg.total_steps:
                means = {k: sum(w[k] for w in window) / len(window) for k in window[0]}
                means = mean_over_ranks(means, self.ctx)
                elapsed = time.perf_counter() - started
                means |= {"lr": lr, "samples_per_s": samples_per_step * len(window) / elapsed}
                self.history.append({"step": self.step, **means})
                run.log_metrics(means, step=self.step)
                if self.skipped_samples or self.truncated_shards:  # logged only when there is something to see
                    run.log_metrics({"data_skipped_samples": self.skipped_samples,
                                     "data_truncated_shards": len(self.truncated_shards)}, step=self.step)  # fmt: skip
                bar.set_postfix({k: f"{v:.3g}" for k, v in means.items() if k in ("loss", "lr", "samples_per_s")})
                window, started = [], time.perf_counter()
            if self.step % cfg.checkpoint_every == 0 or self.step % cfg.steps_per_epoch == 0:
                self.save()
        bar.close()
