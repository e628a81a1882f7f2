"""Training images/s of our trainer (`train_one_epoch`) vs a bare torchvision-style loop.

Both run the same model (same initial weights), loss and in-memory batches. The bare loop is
forward, loss, backward, optimizer step on every batch. Our trainer runs with gradient accumulation,
clipping and progress logging, once with accumulation 1 (as many optimizer steps as the bare loop)
and once with `--accumulation`. Measurements are interleaved and repeated (other processes share the
CPU); the median of the repeats is reported, with ratio = trainer / bare.

    python bench/bench_train_throughput.py                                   # CPU, small model, 128 px
    python bench/bench_train_throughput.py --device cuda --arch densenet121 --img-size 1024 \
        --batch-size 8 --amp bf16 --channels-last                             # GPU
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from src.train.losses import get_loss  # noqa: E402
from src.train.models import ARCHS, build_model  # noqa: E402
from src.train.trainer import TrainerConfig, TrainState, train_one_epoch  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", choices=sorted(ARCHS), default="densenet_small")
    p.add_argument("--img-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--batches", type=int, default=8, help="batches per timed pass")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--accumulation", type=int, default=4)
    p.add_argument("--loss", default="FocalSymmetricLovaszHardLogLoss")
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    return p.parse_args()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_loop(model, batches, loss_fn, optimizer, device, amp_dtype, channels_last, scaler) -> None:
    model.train()
    for images, targets in batches:
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        targets = targets.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
        with autocast:
            logits = model(images)
        loss = loss_fn(logits.float(), targets)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()


def main() -> int:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    torch.manual_seed(0)
    base = build_model(args.arch).to(device, memory_format=memory_format)
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 256, (args.batch_size, 4, args.img_size, args.img_size), dtype=torch.uint8,
                              generator=generator),
                (torch.rand(args.batch_size, 19, generator=generator) < 0.2).float())
               for _ in range(args.batches)]
    if device.type == "cuda":
        batches = [(x.pin_memory(), y.pin_memory()) for x, y in batches]
    loss_fn = get_loss(args.loss)
    sizes = [args.batch_size] * args.batches
    images_per_pass = args.batch_size * args.batches

    def make_scaler():
        return torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 and device.type == "cuda" else None

    runners = {}
    model_bare = copy.deepcopy(base)
    optimizer_bare = torch.optim.Adam(model_bare.parameters(), lr=1e-5)
    scaler_bare = make_scaler()
    runners["bare"] = lambda: bare_loop(model_bare, batches, loss_fn, optimizer_bare, device, amp_dtype,
                                        args.channels_last, scaler_bare)
    for accumulation in sorted({1, args.accumulation}):
        model = copy.deepcopy(base)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-5)
        cfg = TrainerConfig(out_dir=Path("."), epochs=1, accumulation_steps=accumulation, clip_norm=1.0,
                            device=device, amp_dtype=amp_dtype, channels_last=args.channels_last,
                            log_every=max(1, args.batches // 2))
        scaler = make_scaler()
        runners[f"trainer_accum{accumulation}"] = (
            lambda model=model, optimizer=optimizer, cfg=cfg, scaler=scaler:
            train_one_epoch(model, batches, sizes, loss_fn, optimizer, cfg, TrainState(), scaler))

    times: dict[str, list[float]] = {name: [] for name in runners}
    for name, run in runners.items():  # warm-up
        run()
        synchronize(device)
    names = list(runners)
    for repeat in range(args.repeats):
        order = names if repeat % 2 == 0 else names[::-1]  # alternate the order: no systematic position bias
        for name in order:
            synchronize(device)
            started = time.perf_counter()
            runners[name]()
            synchronize(device)
            times[name].append(time.perf_counter() - started)
    rates = {name: images_per_pass / statistics.median(values) for name, values in times.items()}
    print(f"device {device}, arch {args.arch}, {args.img_size} px, batch {args.batch_size}, amp {args.amp}, "
          f"channels_last {args.channels_last}, {args.batches} batches x {args.repeats} repeats")
    print("median images/s; ratio = median over repeats of (bare time / trainer time) within the same round")
    for name, rate in rates.items():
        paired = statistics.median(b / t for b, t in zip(times["bare"], times[name]))
        print(f"{name:>18}: {rate:8.2f} images/s" + ("" if name == "bare" else f"   ratio {paired:.3f}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
