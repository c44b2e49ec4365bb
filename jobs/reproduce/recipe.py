"""Reproduce CF-ViT's claims in miniature on Fashion-MNIST. Two token grids: the default 28 px resized to 32 px,
patch 4 (8×8 fine / 4×4 coarse, cheap enough on 2 CPU cores to train both arms to a plateau), or
`--model cfvit_tiny_fmnist`: 28 px upsampled to 56 px, patch 4 (196 fine / 49 coarse tokens, as DeiT-S at 224 px).

    cfvit reproduce [--quick] [--full] [--out docs] [--epochs N] [--seed S] [--device cuda]

Trains (a) the backbone alone on all 196 tokens and (b) CF-ViT on the same backbone with the same recipe
(timm AdamW + cosine schedule, timm train transform, same epochs/batch/lr/seed and data order), evaluates
both on the test set and writes RESULTS.md, results.json and figures (Table 2, throughput, Fig. 8,
Fig. 9, Table 4 selection ablation; with --full also Table 5 reuse and CE+KL vs CE+CE retrained).
Everything is also logged to MLflow. In-process on purpose: on 2 CPU cores a loop with torch's threads
is as fast as Ray with 2 workers, and both arms must see exactly the same recipe.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

import numpy as np
import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2

import cfvit
from cfvit.data import load_fashion_mnist
from cfvit.losses import step_loss
from cfvit.transforms import build_transform
from jobs.train import batch_transforms

ETAS = (0.0, 0.5, 0.75, 0.9, 1.0)
EXIT_ETAS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)  # Fig. 8 sweep
SELECTIONS = ("gca", "last", "random", "negative")
MODEL = "cfvit_tiny32_fmnist"  # the default grid
MODELS = {"cfvit_tiny32_fmnist": ("28 px resized to 32 px, patch 4", "8×8 fine / 4×4 coarse grid (64 / 16 tokens)"),
          "cfvit_tiny_fmnist": ("28 px upsampled to 56 px, patch 4",
                                "14×14 fine / 7×7 coarse grid (196 / 49 tokens, DeiT-S's counts)")}
DEVICES = ("cpu", "cuda")
PAPER = {"flops_fraction_at_backbone_accuracy_max": 0.45, "selection_order": list(SELECTIONS)}


@dataclass
class ReproConfig:
    # The default: both arms to a plateau in about 75 min on 2 CPU cores (docs/RESULTS.md says whether they got there).
    epochs: int = 30
    seed: int = 0
    train_limit: Optional[int] = None  # None or 0: all 60k training images
    test_limit: Optional[int] = None  # None: all 10k test images
    model: str = MODEL
    embed_dim: int = 64
    depth: int = 4
    num_heads: int = 4
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_epochs: int = 1
    min_lr: float = 1e-5
    clip_grad: float = 1.0
    split_fraction: float = 2 / 3  # epochs [0, round(2/3 * epochs)) re-split every patch
    scale: tuple = (0.6, 1.0)  # RandomResizedCrop scale
    hflip: float = 0.5
    bench_images: int = 1024  # test images timed for the throughput ratio
    bench_batch: int = 256
    n_regions: int = 16  # images in the Fig. 9 grid
    device: str = "cpu"  # "cuda": model and batches on the GPU, bf16 autocast
    loader_workers: int = 0  # DataLoader processes for the transforms (a GPU run wants several)
    # timm's train transform as numpy ops on whole batches (jobs/train/batch_transforms.py: the same
    # distributions, within one grey level of PIL) instead of PIL per image: 3-5x cheaper per image, what a
    # GPU run needs to be fed; the CPU default stays per image.
    batched_transforms: bool = False
    full: bool = False
    quick: bool = False

    @property
    def split_epochs(self) -> int:
        return int(self.split_fraction * self.epochs + 0.5)

    def __post_init__(self):
        positive = ("epochs", "embed_dim", "depth", "num_heads", "batch_size", "bench_images", "bench_batch", "n_regions")
        bad = [f"{k}={getattr(self, k)!r} (must be a positive integer)" for k in positive
               if not isinstance(getattr(self, k), int) or getattr(self, k) < 1]
        bad += [f"{k}={getattr(self, k)!r} (must be >= 0; 0 or None: the whole split)"
                for k in ("train_limit", "test_limit") if getattr(self, k) is not None and getattr(self, k) < 0]
        if not self.lr > 0:
            bad.append(f"lr={self.lr!r} (must be > 0)")
        if self.train_limit and self.train_limit < self.batch_size:
            bad.append(f"train_limit={self.train_limit} is smaller than batch_size={self.batch_size} (no full batch)")
        if self.model not in MODELS:
            bad.append(f"model={self.model!r} (one of {', '.join(MODELS)})")
        if self.device not in DEVICES:
            bad.append(f"device={self.device!r} (one of {', '.join(DEVICES)})")
        if not isinstance(self.loader_workers, int) or self.loader_workers < 0:
            bad.append(f"loader_workers={self.loader_workers!r} (must be >= 0)")
        if self.embed_dim % self.num_heads:
            bad.append(f"embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}")
        if bad:
            raise ValueError("invalid reproduce config: " + "; ".join(bad))

    def model_kwargs(self) -> dict:
        return dict(embed_dim=self.embed_dim, depth=self.depth, num_heads=self.num_heads)


QUICK = dict(epochs=1, train_limit=256, test_limit=128, embed_dim=32, depth=3, num_heads=2, batch_size=64,
             warmup_epochs=0, bench_images=64, bench_batch=32, n_regions=8, quick=True)


# `--gpu-recipe`: all 60k images, 100 epochs, both arms and the --full ablations on one GPU, sized for about
# 8 minutes on an H100/H200 (README, "Benchmarks and results": the arithmetic, and whether it has been run).
# Large batches keep a 64-dim model's steps few (kernel launches, not FLOPs, bound it); the lr grows with
# about the square root of the batch; whole-batch numpy transforms in 8 loader processes feed it.
GPU_RECIPE = dict(device="cuda", epochs=100, train_limit=None, batch_size=1024, lr=4e-3, warmup_epochs=5,
                  batched_transforms=True, loader_workers=8, bench_images=8192, bench_batch=1024, full=True)


def make_config(quick: bool = False, full: bool = False, gpu_recipe: bool = False, **overrides) -> ReproConfig:
    if quick and gpu_recipe:
        raise ValueError("invalid reproduce config: --quick and --gpu-recipe exclude each other")
    base = QUICK if quick else GPU_RECIPE if gpu_recipe else {}
    cfg = ReproConfig(**{**base, "full": full or bool(base.get("full"))})
    return replace(cfg, **{k: v for k, v in overrides.items() if v is not None})


# ---------------------------------------------------------------------------------------------- data
def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _subset(images, labels, limit: Optional[int], seed: int):
    """A random subset (a seeded permutation; roughly class-balanced as the splits are), or everything."""
    if not limit or limit >= len(labels):
        return images, labels
    idx = np.random.default_rng(seed).permutation(len(labels))[:limit]
    return images[idx], labels[idx]


class _Batches:
    """Whole training batches through `jobs.train.batch_transforms` (numpy), one seeded permutation per epoch;
    the DataLoader is built with batch_size=None and indexes batches."""

    def __init__(self, images, labels, data_config: dict, cfg: "ReproConfig"):
        self.images, self.labels, self.data_config, self.cfg = images, labels, data_config, cfg
        self.aug = {"scale": tuple(cfg.scale), "hflip": cfg.hflip}
        self.epoch = 0
        self._order = (None, None)  # (epoch, its permutation): drawn once per epoch, not per batch

    def __len__(self):
        return len(self.labels) // self.cfg.batch_size  # drop_last

    def __getitem__(self, i):
        bs = self.cfg.batch_size
        if self._order[0] != self.epoch:
            self._order = (self.epoch, np.random.default_rng((self.cfg.seed, self.epoch)).permutation(len(self.labels)))
        idx = self._order[1][i * bs:(i + 1) * bs]
        rng = np.random.default_rng((self.cfg.seed, self.epoch, i))
        x = batch_transforms.transform(self.images[idx], self.data_config, True, self.aug, rng)
        return torch.from_numpy(x), torch.from_numpy(np.asarray(self.labels[idx], dtype=np.int64))


class _Images:
    """uint8 arrays through a timm transform (PIL per image), as the training job's data path does."""
    def __init__(self, images, labels, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(self.images[i]), int(self.labels[i])


def load_data(cfg: ReproConfig, data_config: dict):
    tr_x, tr_y = _subset(*load_fashion_mnist("train"), cfg.train_limit, cfg.seed)
    te_x, te_y = _subset(*load_fashion_mnist("test"), cfg.test_limit, cfg.seed)
    if cfg.batched_transforms:
        train = _Batches(tr_x, tr_y, data_config, cfg)
    else:
        train = _Images(tr_x, tr_y, build_transform(data_config, is_training=True, scale=tuple(cfg.scale),
                                                    hflip=cfg.hflip))
    eval_tf = build_transform(data_config, is_training=False)
    test_x = torch.stack([eval_tf(im) for im in te_x])  # deterministic: transform once
    return train, test_x, torch.from_numpy(np.asarray(te_y))


# ---------------------------------------------------------------------------------------------- training
@dataclass
class ArmResult:
    name: str
    history: list = field(default_factory=list)
    train_seconds: float = 0.0


def autocast(device: str):
    """bf16 autocast on a GPU (where it pays), nothing on the CPU (fp32 there, as every CPU figure so far)."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else contextlib.nullcontext()


def _loader(cfg: ReproConfig, train_set):
    if isinstance(train_set, _Batches):  # whole batches: the dataset shuffles (per epoch, seeded)
        return torch.utils.data.DataLoader(train_set, batch_size=None, shuffle=False, num_workers=cfg.loader_workers,
                                           pin_memory=cfg.device == "cuda")
    return torch.utils.data.DataLoader(train_set, batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                                       generator=torch.Generator().manual_seed(cfg.seed), num_workers=cfg.loader_workers,
                                       pin_memory=cfg.device == "cuda", persistent_workers=cfg.loader_workers > 0)


# ~60 lines: the one training loop every arm shares; split, the recipe would no longer read as one.
def train_arm(name: str, cfg: ReproConfig, train_set, *, backbone_only: bool = False, reuse: str = "mlp",
              coarse_loss: str = "kl", log_epoch: Optional[Callable[[dict, int], None]] = None,
              evaluate: Optional[Callable[[object], dict]] = None):
    """Train one arm with the shared recipe. The model is always built as CF-ViT with the same seed, so the
    backbone arm starts from exactly the same backbone weights and sees the same batches in the same order.
    `evaluate(model)` (test-set metrics, model in eval mode) runs after every epoch: the history shows the plateau."""


    torch.manual_seed(cfg.seed)
    model = cfvit.create_model(cfg.model, reuse=reuse, **cfg.model_kwargs()).to(cfg.device)
    params = model.vit if backbone_only else model
    optimizer = create_optimizer_v2(params, opt="adamw", lr=cfg.lr, weight_decay=cfg.weight_decay)
    loader = _loader(cfg, train_set)
    steps = len(loader)
    # per-step cosine: with a handful of epochs a per-epoch schedule would be too coarse
    scheduler, _ = create_scheduler_v2(optimizer, sched="cosine", num_epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs,
                                       min_lr=cfg.min_lr, step_on_epochs=False, updates_per_epoch=steps)
    res = ArmResult(name)
    t0 = time.perf_counter()
    for epoch in range(cfg.epochs):
        if isinstance(train_set, _Batches):
            train_set.epoch = epoch  # before the loader's workers take their copy
        split_all = epoch < cfg.split_epochs
        te = time.perf_counter()
        tot = {"loss": 0.0, "correct": 0, "coarse_correct": 0, "n": 0}
        model.train()
        for i, (x, y) in enumerate(loader):
            x, y = x.to(cfg.device, non_blocking=True), y.to(cfg.device, non_blocking=True)
            # bf16 autocast on a GPU (plain PyTorch, no DeepSpeed here); no label smoothing: the recipe is the
            # paper's minus its ImageNet regularisers, the same for both arms
            with autocast(cfg.device):
                step = step_loss(model, x, y, split_all=split_all, coarse_loss=coarse_loss, backbone_only=backbone_only)
            loss, logits = step.loss, step.logits
            if step.coarse_logits is not None:
                tot["coarse_correct"] += int((step.coarse_logits.argmax(-1) == y).sum())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params.parameters(), cfg.clip_grad)
            optimizer.step()
            scheduler.step_update(epoch * steps + i + 1)
            tot["loss"] += loss.item() * len(y)
            tot["correct"] += int((logits.argmax(-1) == y).sum())
            tot["n"] += len(y)
        m = {"epoch": epoch + 1, "train_loss": tot["loss"] / tot["n"], "train_top1": tot["correct"] / tot["n"],
             "lr": optimizer.param_groups[0]["lr"], "epoch_seconds": time.perf_counter() - te,
             "split_all": int(split_all and not backbone_only)}
        if not backbone_only:
            m["train_coarse_top1"] = tot["coarse_correct"] / tot["n"]
        model.eval()
        model.split_all = False
        if evaluate:
            m.update(evaluate(model))
        res.history.append(m)
        _log(_epoch_line(name, cfg, m, tot["n"]))
        if log_epoch:
            log_epoch(m, epoch + 1)
    res.train_seconds = time.perf_counter() - t0
    return model, res


def _epoch_line(name: str, cfg: ReproConfig, m: dict, n: int) -> str:
    labels = {"test_coarse_top1": "test coarse", "test_top1": "test"}
    test = "".join(f", {labels[k]} {100 * m[k]:.2f}%" for k in labels if k in m)
    phase = " split-all" if m["split_all"] else ""
    return (f"{name} epoch {m['epoch']}/{cfg.epochs}{phase}: loss {m['train_loss']:.3f}, train {100 * m['train_top1']:.2f}%"
            f"{test} ({n / m['epoch_seconds']:.0f} img/s)")


# ---------------------------------------------------------------------------------------------- evaluation
