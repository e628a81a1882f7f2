"""One training loop for the image-level and the cell-level models.

Gradient accumulation. The micro-batches of an epoch are cut into groups of k consecutive batches
(`accumulation_steps`); the optimizer steps once per group. Each micro-batch loss (a mean over its
samples) is scaled by size / (samples in its group) before backward, so the accumulated gradient is
the mean over the group's samples: k batches of b give the update of one batch of k*b, for any loss
that is a mean of per-sample terms (focal, BCE, Lovasz per image; not the hard log loss, whose mining
depends on the batch and is done per micro-batch). When an epoch's batch count is not a multiple of k,
the last group is shorter and its step uses the mean over its own samples (same learning rate).
Under DDP each rank does the same on its shard (equal shard sizes by padding) and gradients are
all-reduced (averaged) only on the group's last micro-batch, so the update is that of the global batch.

Clipping (`clip_norm`) applies to the accumulated gradient before the step. AMP: autocast with
`amp_dtype` (bf16 or fp16; fp16 uses a GradScaler supplied by the caller), losses in float32.

Checkpoints in `out_dir`: `last.pth` (everything needed to resume exactly: model, optimizer, scaler,
trainer state incl. epoch / micro-batch / step / history, RNG states of every rank) written atomically
every `checkpoint_every_steps` optimizer steps and at each epoch end; `best.pth` (by `select_metric`,
the start-of-training evaluation included) and `final.pth`. Per epoch: `metrics.csv` and `curves.png`.
Only rank 0 writes.
"""
from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from src.train.datasets import micro_batch_sizes
from src.train.distributed import all_gather_objects, broadcast_buffers, rank, unwrap, world_size
from src.train.models import CheckpointError, read_checkpoint
from src.utils.io import atomic_path, write_csv_atomic

log = logging.getLogger(__name__)
TRAIN_CHECKPOINT_FORMAT = "hpa-train-state-v1"
MODEL_CHECKPOINT_FORMAT = "hpa-model-v1"
MetricsFn = Callable[[np.ndarray, np.ndarray], dict]


class TrainingInterrupted(RuntimeError):
    """Raised by `stop_after_steps` to simulate a kill (tests of --resume)."""


@dataclass
class TrainerConfig:
    out_dir: Path
    epochs: int
    accumulation_steps: int = 1
    clip_norm: float | None = 1.0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    amp_dtype: torch.dtype | None = None
    channels_last: bool = False
    freeze_bn: bool = False          # BatchNorm layers in eval mode while training
    eval_at_start: bool = False
    select_metric: str = "val_focal_loss"
    select_mode: str = "min"         # "min" or "max"
    checkpoint_every_steps: int = 0  # 0: last.pth at epoch ends only
    stop_after_steps: int | None = None
    log_every: int = 50              # micro-batches between progress lines; 0: none
    metadata: dict[str, Any] = field(default_factory=dict)  # stored in every checkpoint


@dataclass
class TrainState:
    epoch: int = 0          # epochs completed
    micro_batch: int = 0    # micro-batches of the current epoch already applied
    step: int = 0           # optimizer steps so far
    best_value: float | None = None
    best_epoch: int | None = None
    history: list[dict] = field(default_factory=list)
    loss_sum: float = 0.0   # training loss summed over the samples of the current epoch so far
    loss_count: int = 0
    epoch_seconds: float = 0.0


def set_train_mode(model: nn.Module, freeze_bn: bool = False) -> None:
    model.train()
    if freeze_bn:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


def autocast_context(device: torch.device, amp_dtype: torch.dtype | None):
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def apply_gradients(model: nn.Module, optimizer: torch.optim.Optimizer, clip_norm: float | None,
                    scaler: torch.amp.GradScaler | None = None) -> None:
    """Clip the accumulated gradient, step, zero the gradients. Without a GradScaler a non-finite
    gradient norm (seen when clipping) skips the step, as the scaler does for fp16."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    if clip_norm:
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
        if scaler is None and not bool(torch.isfinite(norm)):
            log.warning("non-finite gradient norm: optimizer step skipped")
            optimizer.zero_grad(set_to_none=True)
            return
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def train_one_epoch(model: nn.Module, batches: Iterable, batch_sizes: Sequence[int], loss_fn: Callable,
                    optimizer: torch.optim.Optimizer, cfg: TrainerConfig, state: TrainState,
                    scaler: torch.amp.GradScaler | None = None,
                    after_step: Callable[[Callable[[], None]], None] | None = None) -> float:
    """Train over `batches` ((images, targets, ...) tuples), which start at micro-batch `state.micro_batch`
    of an epoch whose batch sizes are `batch_sizes`. Returns the epoch's mean training loss per sample.

    `after_step(flush)` runs after every optimizer step (state already updated); calling `flush()`
    moves the running loss into `state` so that a checkpoint taken then is complete.
    """
    set_train_mode(model, cfg.freeze_bn)
    k = max(1, int(cfg.accumulation_steps))
    total = len(batch_sizes)
    group_samples = [sum(batch_sizes[start:start + k]) for start in range(0, total, k)]
    is_ddp = isinstance(model, DistributedDataParallel)
    running = torch.zeros((), dtype=torch.float64, device=cfg.device)
    running_count = 0

    def flush() -> None:
        nonlocal running_count
        state.loss_sum += float(running)
        state.loss_count += running_count
        running.zero_()
        running_count = 0

    optimizer.zero_grad(set_to_none=True)
    started, logged_at = time.perf_counter(), state.micro_batch
    for index, batch in enumerate(batches, start=state.micro_batch):
        if index >= total:
            raise RuntimeError(f"more batches than the {total} expected in this epoch")
        images = batch[0].to(cfg.device, non_blocking=True)
        if cfg.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        targets = batch[1].to(cfg.device, non_blocking=True).float()
        size = images.shape[0]
        if size != batch_sizes[index]:
            raise ValueError(f"micro-batch {index} has {size} samples, expected {batch_sizes[index]}")
        closes_group = (index + 1) % k == 0 or index + 1 == total
        sync = model.no_sync() if (is_ddp and not closes_group) else contextlib.nullcontext()
        with sync:
            with autocast_context(cfg.device, cfg.amp_dtype):
                logits = model(images)
            loss = loss_fn(logits.float(), targets)
            scaled = loss * (size / group_samples[index // k])
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        running += loss.detach().double() * size
        running_count += size
        if closes_group:
            apply_gradients(model, optimizer, cfg.clip_norm, scaler)
            state.step += 1
            state.micro_batch = index + 1
            if after_step is not None:
                after_step(flush)
        if cfg.log_every and (index + 1) % cfg.log_every == 0 and rank() == 0:
            seconds = time.perf_counter() - started
            log.info("epoch %d  batch %d/%d  step %d  loss %.4f  %.1f img/s", state.epoch + 1, index + 1, total,
                     state.step, float(running) / max(running_count, 1),
                     sum(batch_sizes[logged_at:index + 1]) / max(seconds, 1e-9))
            started, logged_at = time.perf_counter(), index + 1
    flush()
    return state.loss_sum / max(state.loss_count, 1)


@torch.no_grad()
def predict(model: nn.Module, loader: Iterable, cfg: TrainerConfig) -> tuple[np.ndarray, np.ndarray]:
    """(logits, targets) as float32 arrays over the whole evaluation set, gathered from every rank, in
    dataset order (batches carrying an index as third element are de-duplicated and sorted by it)."""
    net = unwrap(model)
    broadcast_buffers(net)  # every rank evaluates (and rank 0 saves) the same model
    was_training = net.training
    net.eval()
    logits_parts, target_parts, index_parts = [], [], []
    seen = 0
    for batch in loader:
        images = batch[0].to(cfg.device, non_blocking=True)
        if cfg.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast_context(cfg.device, cfg.amp_dtype):
            logits = net(images)
        logits_parts.append(logits.float().cpu().numpy())
        target_parts.append(batch[1].float().numpy())
        index_parts.append(np.asarray(batch[2]) if len(batch) > 2 else np.arange(seen, seen + len(images)))
        seen += len(images)
    net.train(was_training)
    width = unwrap(model).logit.out_features if hasattr(unwrap(model), "logit") else 0
    local = (np.concatenate(logits_parts) if logits_parts else np.zeros((0, width), np.float32),
             np.concatenate(target_parts) if target_parts else np.zeros((0, width), np.float32),
             np.concatenate(index_parts) if index_parts else np.zeros(0, np.int64))
    parts = all_gather_objects(local)
    logits, targets, indices = (np.concatenate([part[i] for part in parts]) for i in range(3))
    indices, first = np.unique(indices, return_index=True)  # drops the padding duplicates of DDP shards
    return logits[first], targets[first]


# --------------------------------------------------------------------------------------------------
# Checkpoints and RNG
# --------------------------------------------------------------------------------------------------
def capture_rng_state() -> dict[str, Any]:
    name, keys, position, has_gauss, cached = np.random.get_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    return {"python": random.getstate(), "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(position),
                                                   int(has_gauss), float(cached)),
            "torch": torch.get_rng_state(), "cuda": cuda}


def restore_rng_state(saved: dict[str, Any]) -> None:
    random.setstate(saved["python"])
    name, keys, position, has_gauss, cached = saved["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(saved["torch"])
    if saved["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["cuda"])


def _to_tuple_state(obj: Any) -> Any:
    # python's random state must be a tuple of tuples; weights_only loading returns them as tuples anyway
    return tuple(_to_tuple_state(x) for x in obj) if isinstance(obj, (list, tuple)) else obj


def save_training_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                             scaler: torch.amp.GradScaler | None, state: TrainState, cfg: TrainerConfig) -> None:
    """Collective under DDP (gathers every rank's RNG state); rank 0 writes `path` atomically."""
    rng_states = all_gather_objects(capture_rng_state())
    if rank() != 0:
        return
    payload = {"format": TRAIN_CHECKPOINT_FORMAT, "model": unwrap(model).state_dict(),
               "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler is not None else None,
               "trainer_state": asdict(state), "rng": rng_states, "world_size": len(rng_states),
               "model_config": cfg.metadata.get("model_config"), "metadata": cfg.metadata}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_training_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                             scaler: torch.amp.GradScaler | None = None, checkpoint: dict | None = None) -> TrainState:
    """Restore model, optimizer, scaler and this rank's RNG from `last.pth` (or from `checkpoint`, that
    file already read); returns the trainer state."""
    checkpoint = read_checkpoint(path) if checkpoint is None else checkpoint
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != TRAIN_CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a training-state checkpoint")
    unwrap(model).load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    if scaler is not None and checkpoint.get("scaler"):
        scaler.load_state_dict(checkpoint["scaler"])
    rng_states = checkpoint["rng"]
    if len(rng_states) != world_size():
        log.warning("%s was written by %d processes, resuming with %d: RNG streams will differ",
                    path, len(rng_states), world_size())
    saved = rng_states[rank() % len(rng_states)]
    saved["python"] = _to_tuple_state(saved["python"])
    restore_rng_state(saved)
    return TrainState(**checkpoint["trainer_state"])


def save_model_checkpoint(path: Path, model: nn.Module, cfg: TrainerConfig, row: dict) -> None:
    if rank() != 0:
        return
    payload = {"format": MODEL_CHECKPOINT_FORMAT, "model": unwrap(model).state_dict(),
               "model_config": cfg.metadata.get("model_config"), "metadata": cfg.metadata, "metrics": row}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def write_metrics(history: list[dict], out_dir: Path) -> None:
    """metrics.csv (one row per evaluation) and curves.png."""
    frame = pd.DataFrame(history)
    write_csv_atomic(frame, out_dir / "metrics.csv")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loss_columns = [c for c in frame.columns if c.endswith("loss")]
    other_columns = [c for c in frame.columns if c.startswith("val_") and c not in loss_columns]
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for column in loss_columns:
        axes[0].plot(frame["epoch"], frame[column], marker="o", label=column)
    for column in other_columns:
        axes[1].plot(frame["epoch"], frame[column], marker="o", label=column)
    for axis, title in zip(axes, ("loss", "validation metrics")):
        axis.set_xlabel("epoch")
        axis.set_title(title)
        if axis.lines:
            axis.legend()
    figure.tight_layout()
    with atomic_path(out_dir / "curves.png") as tmp:
        figure.savefig(tmp, dpi=80)
    plt.close(figure)


# --------------------------------------------------------------------------------------------------
# The loop over epochs
# --------------------------------------------------------------------------------------------------
def _is_better(value: float, best: float | None, mode: str) -> bool:
    if not math.isfinite(value):
        return False
    return best is None or (value < best if mode == "min" else value > best)


def fit(model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: Callable, train_loader: Any,
        valid_loader: Iterable, lr_for_epoch: Callable[[int], float], metrics_fn: MetricsFn,
        cfg: TrainerConfig, state: TrainState | None = None,
        scaler: torch.amp.GradScaler | None = None) -> TrainState:
    """Train `cfg.epochs` epochs from `state` (fresh or from `load_training_checkpoint`).

    `train_loader` is a DataLoader whose sampler has `set_epoch`, `set_start` and `num_samples`
    (`ResumableDistributedSampler`). `metrics_fn(logits, targets)` gives the validation metrics; the
    one named `cfg.select_metric` picks `best.pth`.
    """
    out_dir = Path(cfg.out_dir)
    state = state or TrainState()
    sampler = train_loader.sampler

    def record(row: dict) -> None:
        state.history.append(row)
        log.info("epoch %s: %s", row["epoch"], "  ".join(f"{k} {v:.5g}" if isinstance(v, float) else f"{k} {v}"
                                                        for k, v in row.items() if k != "epoch"))
        value = row.get(cfg.select_metric, float("nan"))
        if _is_better(float(value), state.best_value, cfg.select_mode):
            state.best_value, state.best_epoch = float(value), int(row["epoch"])
            save_model_checkpoint(out_dir / "best.pth", model, cfg, row)
        if rank() == 0:
            write_metrics(state.history, out_dir)

    if cfg.eval_at_start and not state.history and state.step == 0 and state.micro_batch == 0:
        started = time.perf_counter()
        metrics = metrics_fn(*predict(model, valid_loader, cfg))
        record({"epoch": 0, "lr": float("nan"), "train_loss": float("nan"), **metrics,
                "seconds": time.perf_counter() - started, "step": 0})

    for epoch in range(state.epoch, cfg.epochs):
        lr = lr_for_epoch(epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        sizes = micro_batch_sizes(sampler.num_samples, train_loader.batch_size, train_loader.drop_last)
        sampler.set_epoch(epoch)
        sampler.set_start(sum(sizes[:state.micro_batch]))
        started, seconds_before = time.perf_counter(), state.epoch_seconds

        def after_step(flush: Callable[[], None]) -> None:
            if cfg.checkpoint_every_steps and state.step % cfg.checkpoint_every_steps == 0:
                flush()
                state.epoch_seconds = seconds_before + time.perf_counter() - started
                save_training_checkpoint(out_dir / "last.pth", model, optimizer, scaler, state, cfg)
            if cfg.stop_after_steps is not None and state.step >= cfg.stop_after_steps:
                raise TrainingInterrupted(f"stopped after optimizer step {state.step} (stop_after_steps)")

        train_loss = train_one_epoch(model, train_loader, sizes, loss_fn, optimizer, cfg, state, scaler, after_step)
        metrics = metrics_fn(*predict(model, valid_loader, cfg))
        row = {"epoch": epoch + 1, "lr": lr, "train_loss": train_loss, **metrics,
               "seconds": seconds_before + time.perf_counter() - started, "step": state.step}
        state.epoch, state.micro_batch = epoch + 1, 0
        state.loss_sum, state.loss_count, state.epoch_seconds = 0.0, 0, 0.0
        record(row)
        save_training_checkpoint(out_dir / "last.pth", model, optimizer, scaler, state, cfg)

    save_model_checkpoint(out_dir / "final.pth", model, cfg, state.history[-1] if state.history else {})
    return state
