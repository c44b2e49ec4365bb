"""A training run as a person watches it (`cfvit train`, `cfvit pipeline`): one line per epoch above a progress
bar of the running epoch, fed by rank 0's progress records; Ray's and the workers' other lines stay in the
log file of `cfvit_common.logs.routed_logs` (or stream, with `verbose`)."""
from __future__ import annotations

from typing import Optional

from cfvit.data import load_fashion_mnist
from cfvit_common.logs import forward_worker_lines
from cfvit_common.progress import TrainingProgress

from .config import JobConfig
from .driver import TrainingOutcome, init_ray, run_training
from .sources import builtin_split, is_builtin

PROGRESS_EVERY_S = 1.0  # rank 0's progress records, when a bar draws them


def train_images(cfg: JobConfig) -> Optional[int]:
    """How many images one epoch reads, where that is known without listing files (the built-in set, a limit)."""
    if not is_builtin(cfg.data.train):
        return cfg.data.train_limit
    total = len(load_fashion_mnist(builtin_split(cfg.data.train, "train"))[1])
    return min(total, cfg.data.train_limit or total)


def steps_per_epoch(cfg: JobConfig) -> Optional[int]:
    """Micro-batches per worker and epoch (the bar's length), or None when the source's size is unknown."""
    n = train_images(cfg)
    steps = n // cfg.scaling.num_workers // cfg.deepspeed.micro_batch_size if n else None
    if cfg.debug.max_steps_per_epoch and steps:
        steps = min(steps, cfg.debug.max_steps_per_epoch)
    return steps


def run_watched(cfg: JobConfig, console, verbose: bool = False, **kw) -> TrainingOutcome:
    """`run_training` with its epoch lines and a progress bar on `console` (rich). Starts (or joins) Ray
    first: the workers' output can only be picked out of Ray's stream once it runs. `verbose`: the bar only,
    every line streams as Ray prints it, the progress records too."""
    if not cfg.log.progress_every_s:
        cfg.log.progress_every_s = PROGRESS_EVERY_S
    init_ray(cfg, min_cpus=cfg.scaling.num_workers * cfg.scaling.cpus_per_worker + 2)
    with TrainingProgress(console, steps_per_epoch(cfg)) as bar:
        # verbose: Ray's printer streams the epoch lines with the rest (a reader line goes there too)
        forward_worker_lines((lambda line: None) if verbose else bar.line, bar.update, keep_progress=verbose)
        return run_training(cfg, **kw)
