"""Image-level DenseNet121 training (stage 6): large effective batches by gradient accumulation.

    python -m src.train.train_bestfitting --fold 0 --img_size 1024 --batch_size 8 --workers 16 \
        --gradient-accumulation-steps 200 --scheduler Adam10 --epochs 10 --scheduler-lr-multiplier 4 \
        --out_dir densenet121_1024__gradaccum_200__start_lr_4e5 --eval-at-start
    torchrun --nproc_per_node 4 -m src.train.train_bestfitting ...   # DDP: same flags, --batch_size per GPU

Train = images whose folds.csv fold != --fold, validation = fold == --fold. Outputs in
`{output}/models/{out_dir}/fold{N}/`: best.pth (by --select-by), final.pth, last.pth (resumable with
--resume), metrics.csv, curves.png. Initial weights: --load-state-dict-path (the previous-competition
model, a torchvision ImageNet state dict or one of our checkpoints), else --init-weights; loading is
strict (a checkpoint that does not fit --arch stops the run) unless --non-strict. The default
--arch densenet121_large is the network of the 2018 checkpoint, as in the reference.
Under DDP the effective batch is batch_size x GPUs x accumulation steps.
"""
from __future__ import annotations

import argparse
import logging
import os
import random
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from src.data.schema import DatasetLayout, OutputLayout
from src.train.copy_paste import RarePasteDataset
from src.train.datasets import (ImageLevelDataset, ResumableDistributedSampler, SampleReadError, fold_split,
                                 make_loader)
from src.train.distributed import cleanup_distributed, init_distributed
from src.train.losses import LOSSES, get_loss
from src.train.metrics import image_level_metrics
from src.train.models import ARCHS, arch_name, build_model, load_weights, read_checkpoint
from src.train.schedules import SCHEDULES, make_lr_schedule
from src.train.trainer import (TRAIN_CHECKPOINT_FORMAT, TrainerConfig, TrainingInterrupted, fit,
                               load_training_checkpoint)
from src.utils.io import UserInputError, run_cli, setup_logging

log = logging.getLogger("hpa.train")
DEFAULT_PREVIOUS_MODEL = Path("input/pretrained_models/densenet121_hpa2018.pth")
# Settings a resumed run takes from last.pth whatever the command line says (they define the run).
RESUME_FIXED = ("seed", "batch_size", "img_size", "arch", "in_channels", "head", "dropout", "embedding_dim",
                "gradient_accumulation_steps", "loss", "scheduler", "scheduler_lr_multiplier",
                "scheduler_epoch_offset", "clipnorm", "select_by", "public_data", "freeze_bn", "weight_decay")
INTERRUPTED_EXIT_CODE = 75
SELECT_BY = {"loss": ("val_focal_loss", "min"), "map": ("val_map", "max")}


def build_parser(description: str, select_by: dict[str, tuple[str, str]], select_default: str) -> argparse.ArgumentParser:
    """The training flags; train_cellwise adds its own and other defaults to the same parser."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="input/synthetic", help="dataset folder (train.csv, folds.csv, train/, cache_*)")
    p.add_argument("--output", "--output-dir", dest="output", default="output", help="output root; models go to {output}/models/{out_dir}/fold{N}")
    p.add_argument("--public-data", action="store_true", help="also train/validate on public.csv images")
    p.add_argument("--without-public-data", dest="public_data", action="store_false",
                   help="train.csv images only (the default; the reference's flag)")
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--img_size", "--img-size", dest="img_size", type=int, default=1024)
    p.add_argument("--batch_size", "--batch-size", dest="batch_size", type=int, default=8, help="per process")
    p.add_argument("--val-batch-size", type=int, default=None, help="default: 2 x batch_size")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--gradient-accumulation-steps", "--gradient_accumulation_steps", dest="gradient_accumulation_steps",
                   type=int, default=200)
    p.add_argument("--scheduler", choices=SCHEDULES, default="Adam10")
    p.add_argument("--scheduler-lr-multiplier", type=float, default=1.0)
    p.add_argument("--scheduler-epoch-offset", type=int, default=0, help="start the schedule this many epochs in")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--out_dir", "--out-dir", dest="out_dir", default=None, help="run name (default from the flags)")
    p.add_argument("--eval-at-start", action="store_true", help="evaluate before training (row epoch 0)")
    p.add_argument("--load-state-dict-path", default=None, help="initial weights (any supported checkpoint)")
    p.add_argument("--non-strict", action="store_true",
                   help="load what fits from the initial weights instead of stopping at a checkpoint that "
                        "does not fit --arch")
    p.add_argument("--init-weights", default="auto",
                   help=f"when no --load-state-dict-path: 'auto' ({DEFAULT_PREVIOUS_MODEL} if present, for "
                        "densenet121[_large]), 'none', or a path")
    p.add_argument("--loss", choices=sorted(LOSSES), default="FocalSymmetricLovaszHardLogLoss")
    p.add_argument("--gpu-id", type=int, default=0, help="CUDA device when not under torchrun")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--arch", type=arch_name, choices=sorted(ARCHS), default="densenet121_large",
                   help="densenet121_large: the 2018 checkpoint's network (the reference's "
                        "class_densenet121_large_dropout, also accepted)")
    p.add_argument("--in-channels", "--in_channels", dest="in_channels", type=int, default=4,
                   help="input channels, RGBY order (3 = RGB)")
    p.add_argument("--head", choices=("dropout", "plain"), default="dropout")
    p.add_argument("--dropout", type=float, default=0.5)
    p.add_argument("--embedding-dim", type=int, default=None, help="hidden width of the head (default: features)")
    p.add_argument("--memory-efficient", action="store_true", help="DenseNet checkpointing (less GPU memory)")
    p.add_argument("--freeze-bn", action="store_true", help="BatchNorm in eval mode during training")
    p.add_argument("--clipnorm", type=float, default=1.0, help="max gradient norm; 0 disables")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--select-by", choices=sorted(select_by), default=select_default,
                   help="validation metric that picks best.pth")
    p.add_argument("--amp", choices=("auto", "none", "bf16", "fp16"), default="auto",
                   help="auto: bf16 (else fp16) on CUDA, none on CPU")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None, help="default: on CUDA")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--deterministic", action="store_true", help="torch deterministic algorithms")
    p.add_argument("--resume", nargs="?", const=True, default=None, metavar="PATH",
                   help="alone: continue from this run's last.pth if present; with PATH: from that training "
                        "state (a bare file name is looked up in the run's folder)")
    p.add_argument("--checkpoint-every-steps", type=int, default=None,
                   help="write last.pth every this many optimizer steps (default: about every 200 batches)")
    p.add_argument("--stop-after-steps", type=int, default=None, help="stop after this optimizer step (tests)")
    p.add_argument("--log-every", type=int, default=50, help="batches between progress lines")
    p.add_argument("--verbose", action="store_true")
    return p


def finish_args(args: argparse.Namespace) -> argparse.Namespace:
    """Default run name and range checks."""
    if args.out_dir is None:
        args.out_dir = (f"{args.arch}_{args.img_size}__gradaccum_{args.gradient_accumulation_steps}"
                        f"__{args.scheduler}_x{args.scheduler_lr_multiplier:g}")
    for name in ("img_size", "batch_size", "gradient_accumulation_steps", "epochs", "in_channels"):
        if getattr(args, name) < 1:
            raise UserInputError(f"--{name} must be >= 1")
    return args


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser(__doc__, SELECT_BY, "loss")
    parser.add_argument("--paste-rare", type=float, default=0.0,
                        help="probability of pasting a rare-class cell into a training field (src/train/copy_paste.py; 0: off)")
    args = finish_args(parser.parse_args(argv))
    if not 0 <= args.paste_rare <= 1:
        raise UserInputError("--paste-rare must be in [0, 1]")
    return args


def select_device(args: argparse.Namespace) -> torch.device:
    if args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserInputError("--device cuda but no CUDA device is available")
    under_torchrun = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) if under_torchrun else args.gpu_id)


def resolve_amp(choice: str, device: torch.device) -> torch.dtype | None:
    if choice == "none" or (choice == "auto" and device.type != "cuda"):
        return None
    if choice == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[choice]


def initial_weights_path(args: argparse.Namespace) -> Path | None:
    if args.load_state_dict_path:
        return Path(args.load_state_dict_path)
    if args.init_weights == "none":
        return None
    if args.init_weights == "auto":
        if args.arch in ("densenet121_large", "densenet121") and DEFAULT_PREVIOUS_MODEL.is_file():
            return DEFAULT_PREVIOUS_MODEL
        log.warning("no initial weights (put the previous-competition model at %s or pass "
                    "--load-state-dict-path): training from random initialisation", DEFAULT_PREVIOUS_MODEL)
        return None
    return Path(args.init_weights)


def main(argv: list[str] | None = None) -> int:
    return run_main(parse_args(argv), train)


def run_main(args: argparse.Namespace, train_fn: Callable[[argparse.Namespace, torch.device, object], int]) -> int:
    """Logging, device and process group around `train_fn` (shared with src.train.train_cellwise)."""
    setup_logging(args.verbose)
    device = select_device(args)
    dist_info = init_distributed(device.type)
    if not dist_info.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    try:
        return train_fn(args, device, dist_info)
    except TrainingInterrupted as stop:
        log.warning("%s; continue with --resume", stop)
        return INTERRUPTED_EXIT_CODE
    except SampleReadError as error:
        raise SampleReadError(f"{error}; fix or remove it, then continue with --resume") from None
    finally:
        cleanup_distributed()


def train(args: argparse.Namespace, device: torch.device, dist_info) -> int:
    prepare_run(args, device)
    layout = DatasetLayout(args.dataset)
    train_table, valid_table = fold_split(layout, args.fold, args.public_data)
    log.info("fold %d: %d training, %d validation images at %d px", args.fold, len(train_table),
             len(valid_table), args.img_size)
    if not layout.cache_dir(args.img_size).is_dir():
        log.warning("no %s: images are decoded from PNG every epoch (src.preprocessing.cache_images --size %d "
                    "makes training much faster)", layout.cache_dir(args.img_size), args.img_size)
    train_set = ImageLevelDataset(layout, train_table, args.img_size, augment=True, seed=args.seed,
                                  in_channels=args.in_channels)
    valid_set = ImageLevelDataset(layout, valid_table, args.img_size, in_channels=args.in_channels)
    metrics = image_level_metrics(train_set.targets)
    if args.paste_rare:
        train_set = RarePasteDataset(train_set, OutputLayout(args.output).bboxes_dir, args.paste_rare, args.seed)
        log.info("pasting rare cells into %.0f%% of training fields (%d donor cells)", 100 * args.paste_rare,
                 len(train_set.donors))
    return run_training(args, device, dist_info, train_set, valid_set, metrics,
                        *SELECT_BY[args.select_by])


def resume_source(args: argparse.Namespace) -> Path | None:
    """The training state to resume from. `--resume` alone: this run's last.pth, None when there is none
    yet; `--resume PATH`: that file, a bare name looked up in the run's folder (as the reference did)."""
    if not args.resume:
        return None
    run_dir = OutputLayout(args.output).model_dir(args.out_dir, args.fold)
    if args.resume is True:
        if (run_dir / "last.pth").is_file():
            return run_dir / "last.pth"
        log.info("--resume: no %s yet, starting a new run", run_dir / "last.pth")
        return None
    path = Path(args.resume)
    if not path.is_file() and path.name == str(path):
        path = run_dir / path
    if not path.is_file():
        raise UserInputError(f"--resume {args.resume}: no such file (also looked in {run_dir})")
    return path


_read_once: dict[str, dict] = {}  # the resumed last.pth, read by prepare_run and used again by run_training


def prepare_run(args: argparse.Namespace, device: torch.device) -> None:
    """Resume bookkeeping (run-defining settings come from the resumed state) and seeds; shared with
    train_cellwise. Sets `args.resume_from` (str or None)."""
    source = resume_source(args)
    args.resume_from = str(source) if source else None
    if source:
        checkpoint = _read_once[str(source)] = read_checkpoint(source)
        if not isinstance(checkpoint, dict) or checkpoint.get("format") != TRAIN_CHECKPOINT_FORMAT:
            raise UserInputError(f"--resume {source}: not a training state (last.pth); to start from a model's "
                                 "weights use --load-state-dict-path")
        saved_args = (checkpoint.get("metadata") or {}).get("args", {})
        for name in RESUME_FIXED:
            if name in saved_args and saved_args[name] != getattr(args, name):
                log.warning("resume: --%s %s from %s (command line said %s)", name, saved_args[name], source.name,
                            getattr(args, name))
                setattr(args, name, saved_args[name])
    if args.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)  # identical model initialisation on every rank


def run_training(args: argparse.Namespace, device: torch.device, dist_info, train_set, valid_set, metrics_fn,
                 select_metric: str, select_mode: str, loss_fn: torch.nn.Module | None = None) -> int:
    """Model, loaders, optimizer and schedule from the flags, then `fit`; shared with train_cellwise.
    Datasets yield (image, target, index) for keys (index, epoch). `loss_fn`: instead of --loss's."""
    out_dir = OutputLayout(args.output).model_dir(args.out_dir, args.fold)
    resuming = args.resume_from is not None
    world, rank_ = dist_info.world_size, dist_info.rank
    pin = device.type == "cuda"
    train_sampler = ResumableDistributedSampler(train_set, world, rank_, True, args.seed)
    # A last training batch of one sample cannot pass the head's BatchNorm: drop it (it reshuffles each epoch).
    lone_last = train_sampler.num_samples % args.batch_size == 1 and train_sampler.num_samples > 1
    train_loader = make_loader(train_set, train_sampler, args.batch_size, args.workers, pin, args.seed, lone_last)
    valid_loader = make_loader(valid_set, ResumableDistributedSampler(valid_set, world, rank_, False, args.seed),
                               args.val_batch_size or 2 * args.batch_size, args.workers, pin, args.seed)

    model = build_model(args.arch, args.in_channels, dropout=args.dropout, embedding_dim=args.embedding_dim,
                        head=args.head, memory_efficient=args.memory_efficient)
    weights = None if resuming else initial_weights_path(args)
    if weights is not None:
        if not weights.is_file():
            raise UserInputError(f"{weights}: initial weights not found")
        load_weights(model, weights, strict=not args.non_strict)
    channels_last = device.type == "cuda" if args.channels_last is None else args.channels_last
    model = model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    model_config = model.config()
    if dist_info.enabled:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    lr_for_epoch = make_lr_schedule(args.scheduler, args.scheduler_lr_multiplier, args.scheduler_epoch_offset,
                                    args.epochs)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr_for_epoch(0), weight_decay=args.weight_decay)
    amp_dtype = resolve_amp(args.amp, device)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 and device.type == "cuda" else None
    checkpoint_every = args.checkpoint_every_steps
    if checkpoint_every is None:
        checkpoint_every = max(1, round(200 / args.gradient_accumulation_steps))
    cfg = TrainerConfig(
        out_dir=out_dir, epochs=args.epochs, accumulation_steps=args.gradient_accumulation_steps,
        clip_norm=args.clipnorm or None, device=device, amp_dtype=amp_dtype, channels_last=channels_last,
        freeze_bn=args.freeze_bn, eval_at_start=args.eval_at_start,
        select_metric=select_metric, select_mode=select_mode, checkpoint_every_steps=checkpoint_every,
        stop_after_steps=args.stop_after_steps, log_every=args.log_every,
        metadata={"args": vars(args), "model_config": model_config, "world_size": world})
    state = None
    if resuming:
        state = load_training_checkpoint(Path(args.resume_from), model, optimizer, scaler,
                                         checkpoint=_read_once.pop(args.resume_from, None))
        log.info("resumed from %s: epoch %d, micro-batch %d, step %d", args.resume_from, state.epoch,
                 state.micro_batch, state.step)
    else:
        torch.manual_seed(args.seed * 1000 + rank_ + 1)  # own dropout stream per rank
    log.info("%s: effective batch %d (%d x %d processes x %d accumulation), loss %s, schedule %s x %g, amp %s",
             args.arch, args.batch_size * world * args.gradient_accumulation_steps, args.batch_size, world,
             args.gradient_accumulation_steps, args.loss, args.scheduler, args.scheduler_lr_multiplier,
             amp_dtype)
    state = fit(model, optimizer, loss_fn or get_loss(args.loss), train_loader, valid_loader, lr_for_epoch,
                metrics_fn, cfg, state, scaler)
    if dist_info.is_main and state.best_epoch is not None:
        best = next(row for row in state.history if row["epoch"] == state.best_epoch)
        log.info("best epoch %d: %s; outputs in %s", state.best_epoch,
                 ", ".join(f"{k} {v:.4f}" for k, v in best.items() if k.startswith("val_")), out_dir)
    return 0


if __name__ == "__main__":
    run_cli(main)
