"""What every Ray Train worker runs: set up the DeepSpeed engine, then per epoch train, validate, report.

`train_loop_per_worker(config)` reports per-epoch metrics with `ray.train.report`, so it works under Ray
Tune as well. The driver hands each worker a `WorkerSetup`; an epoch's figures add up in `EpochSums`.
"""
from __future__ import annotations

import copy
import json
import os
import signal
import sys
import tempfile
import time
import warnings
from dataclasses import astuple, dataclass, field
from pathlib import Path
from typing import Any, Optional

import deepspeed
import numpy as np
import ray.train
import torch
import torch.distributed as dist
from timm.data import Mixup
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2

import cfvit
from cfvit.budget import agreement_profile, eta_curve, eta_table, point_at
from cfvit.losses import COARSE_PART, step_loss
from cfvit_common import tracking
from cfvit_common.logs import PROGRESS_TAG

from . import device_augment
from .config import JobConfig
from .data import train_augment
from .deepspeed import deepspeed_config, use_weights_only_loading
from .stall import DataWatchdog

DS_TAG = "deepspeed"  # DeepSpeed state inside a Ray checkpoint (for resuming)
EXPORT_DIR = "model"  # cfvit.save export inside a Ray checkpoint (for serving)
STATE_FILE = "train_state.json"


@dataclass(frozen=True)
class WorkerSetup:
    """What the driver works out once and every training worker receives (with the job's config)."""

    classes: list[str]
    data_config: dict
    stage_gflops: dict[str, float]
    backbone_gflops: float
    mlflow_run_id: Optional[str] = None
    tracking_uri: Optional[str] = None


@dataclass
class EpochSums:
    """What one worker adds up over an epoch; `all_reduced()` sums it over every rank."""

    loss: float = 0.0  # loss × images
    ce: float = 0.0  # fine cross-entropy × images
    aux: float = 0.0  # the coarse loss (KL or CE) × images
    images: float = 0.0  # mixup-weighted: a micro-batch of only corrupt images counts 0
    skipped: float = 0.0  # corrupt or unlabelled images dropped
    wait_s: float = 0.0  # seconds waiting for the next batch from Ray Data

    def add_step(self, step, images: float, skipped: int, aux_key: str) -> None:
        self.loss += float(step.loss.detach()) * images
        self.ce += step.parts["ce"] * images
        self.aux += step.parts[aux_key] * images
        self.images += images
        self.skipped += skipped

    def all_reduced(self) -> "EpochSums":
        t = torch.tensor(astuple(self), dtype=torch.float64)
        if dist.is_initialized():
            dist.all_reduce(t)
        return EpochSums(*t.tolist())


@dataclass
class Worker:
    cfg: JobConfig
    setup: WorkerSetup
    rank: int
    engine: Any
    optimizer: Any
    scheduler: Any
    dtype: Any
    mixup: Any = None
    start_epoch: int = 0
    history: list = field(default_factory=list)  # seconds per epoch (for the ETA)
    setup_seconds: float = 0.0  # model, optimizer, DeepSpeed engine, resume


def train_loop_per_worker(config: dict) -> None:
    cfg, w = config["job"], setup(config["job"], config["setup"])
    for epoch in range(w.start_epoch, cfg.schedule.epochs):
        _kill_drill(cfg, epoch, w.rank)
        t0 = time.perf_counter()
        metrics = train_epoch(w, epoch)
        curve = validate(w, metrics)
        metrics["epoch_seconds"] = epoch_s = time.perf_counter() - t0
        w.history.append(epoch_s)
        metrics["epochs_seconds_total"] = sum(w.history)  # with Tune's clock: the start-up cost of a trial
        metrics["setup_seconds"] = w.setup_seconds
        metrics["eta_seconds"] = (cfg.schedule.epochs - epoch - 1) * (sum(w.history[-3:]) / len(w.history[-3:]))
        if w.rank == 0:
            _say(epoch_line(cfg, metrics))
            if w.setup.mlflow_run_id:
                _log_epoch(w.setup, metrics, curve, epoch, f"{cfg.name} epoch {epoch + 1}")
        checkpoint(w, epoch, metrics, curve)


def setup(cfg: JobConfig, facts: WorkerSetup) -> Worker:
    """Model, optimizer, timm scheduler, DeepSpeed engine, mixup; resume from Ray's last checkpoint."""
    # DeepSpeed's ZeRO calls a torch.distributed API that warns on every step: keep the epoch lines readable.
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*", category=FutureWarning)



    t0 = time.perf_counter()
    rank = ray.train.get_context().get_world_rank()
    # where each rank runs: after a node is lost, the log shows where the restarted group went
    _say(f"[worker] rank {rank} on node {ray.get_runtime_context().get_node_id()}")
    torch.manual_seed(cfg.seed + rank)
    on_gpu = cfg.scaling.use_gpu and torch.cuda.is_available()
    n_classes = len(facts.classes)
    model = cfvit.create_model(cfg.model.name, **cfg.model.create_kwargs(n_classes))
    o, s = cfg.optim, cfg.schedule
    optimizer = create_optimizer_v2(model, opt=o.opt, lr=o.lr, weight_decay=o.weight_decay,
                                    **({"momentum": o.momentum} if "sgd" in o.opt else {}))
    # timm schedulers are pure functions of the epoch: resuming only needs the epoch number
    scheduler, _ = create_scheduler_v2(optimizer, sched=s.sched, num_epochs=s.epochs, warmup_epochs=s.warmup_epochs,
                                       warmup_lr=s.warmup_lr, min_lr=s.min_lr)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                           config=deepspeed_config(cfg, on_gpu), dist_init_required=False)
    use_weights_only_loading(engine)  # resuming never unpickles arbitrary objects from the storage
    dtype = torch.bfloat16 if engine.bfloat16_enabled() else (torch.float16 if engine.fp16_enabled() else torch.float32)
    a = cfg.augment
    mixup = Mixup(mixup_alpha=a.mixup, cutmix_alpha=a.cutmix, prob=a.mixup_prob, switch_prob=a.mixup_switch_prob,
                  label_smoothing=a.label_smoothing, num_classes=n_classes) if (a.mixup or a.cutmix) else None
    w = Worker(cfg, facts, rank, engine, optimizer, scheduler, dtype, mixup)
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            engine.load_checkpoint(d, tag=DS_TAG)  # weights_only: see jobs/train/deepspeed.py
            state = json.loads((Path(d) / STATE_FILE).read_text())
        w.start_epoch, w.history = state["epoch"] + 1, state.get("epoch_seconds", [])
        if rank == 0:
            _say(f"[resume] from the checkpoint of epoch {state['epoch'] + 1}: continuing at epoch "
                 f"{w.start_epoch + 1}")  # 1-based, as the epoch lines
    w.setup_seconds = time.perf_counter() - t0
    return w



def train_epoch(w: Worker, epoch: int) -> dict:
    """One pass over this worker's shard; sums are all-reduced so every rank returns the same metrics.
    `data_wait_share` is the part of the epoch spent waiting for the next batch from Ray Data."""

    cfg, engine = w.cfg, w.engine
    split_all = epoch < cfg.split_epochs
    engine.module.split_all = split_all
    w.scheduler.step(epoch)
    engine.train()
    sums = EpochSums()
    buffer = cfg.data.shuffle_buffer or None
    # Files are shuffled per epoch by the reader; the buffer also mixes images within files/blocks.
    # Seeded per epoch and rank: reproducible, different each epoch.
    batches = _batches(w, "train", epoch, batch_size=cfg.deepspeed.micro_batch_size, drop_last=True,
                       local_shuffle_buffer_size=buffer,
                       local_shuffle_seed=(cfg.seed + 1000 * epoch + w.rank) if buffer else None)
    t0 = time.perf_counter()
    it, step, max_steps = iter(batches), 0, cfg.debug.max_steps_per_epoch
    last_report = t0
    with DataWatchdog(cfg.scaling.stall_timeout_s) as watchdog:
        while not max_steps or step < max_steps:
            t_wait = time.perf_counter()
            batch = next(it, None)
            watchdog.tick()
            sums.wait_s += time.perf_counter() - t_wait
            if batch is None:
                break
            _train_step(w, batch, sums)
            step += 1
            last_report = _progress(w, epoch, step, sums, t0, last_report)
    train_s = time.perf_counter() - t0

    total = sums.all_reduced()
    n = max(total.images, 1)
    return {
        "epoch": epoch, "train_loss": total.loss / n, "train_ce": total.ce / n,
        f"train_{COARSE_PART[cfg.model.coarse_loss]}": total.aux / n, "train_images": total.images,
        "images_per_s": total.images / train_s if train_s else 0.0, "lr": w.optimizer.param_groups[0]["lr"],
        "split_all": int(split_all), "train_skipped_images": total.skipped, "skipped_images": total.skipped,
        "data_wait_share": (total.wait_s / _world()) / train_s if train_s else 0.0,
        "start_epoch": w.start_epoch,  # where this worker group (re)started: shows resumes
    }


def _train_step(w: Worker, batch: dict, sums: EpochSums) -> None:
    """Forward, loss, backward, optimizer step on one micro-batch (added to `sums`). No autocast: DeepSpeed
    holds the weights in the training precision and the inputs are cast to it. Label smoothing only without
    mixup/cutmix, whose soft targets carry it already."""
    cfg, engine = w.cfg, w.engine
    x, y, weight, skipped = _valid_part(batch, w.mixup)
    step = step_loss(engine, x.to(engine.device, w.dtype), y.to(engine.device), coarse_loss=cfg.model.coarse_loss,
                     smoothing=0.0 if w.mixup is not None else cfg.augment.label_smoothing)
    engine.backward(step.loss * weight)
    engine.step()
    sums.add_step(step, len(x) * weight, skipped, COARSE_PART[cfg.model.coarse_loss])


def _valid_part(batch: dict, mixup):
    """The batch's decodable images (x, y), the loss weight and the number skipped. A micro-batch whose
    images were all corrupt still steps (weight 0): every rank must take the same number of steps."""
    valid = batch["valid"].bool()
    x, y = batch["image"][valid], batch["label"][valid]
    skipped = int((~valid).sum())
    if mixup is not None:  # timm's Mixup wants an even batch
        x, y = x[: len(x) // 2 * 2], y[: len(y) // 2 * 2]
    weight = 1.0
    if len(x) == 0:
        x, y, weight = batch["image"][:2], batch["label"][:2], 0.0
    if mixup is not None:
        x, y = mixup(x, y)
    return x, y, weight, skipped


def _batches(w: Worker, role: str, epoch: int = 0, **kw):
    """This worker's `role` shard as torch dicts (`image`, `label`, `valid`). data.decode=device: the rows are
    bytes, decoded and augmented here on the engine's device, seeded from (seed, epoch, rank, step)."""

    shard = ray.train.get_dataset_shard(role)
    if w.cfg.data.decode == "cpu":
        return shard.iter_torch_batches(**kw)

    aug = train_augment(w.cfg) if role == "train" else None
    return device_augment.batches(shard.iter_batches(batch_format="numpy", **kw), w.setup.data_config, aug,
                                  w.engine.device, seed=(w.cfg.seed, epoch, w.rank))



def validate(w: Worker, metrics: dict):
    """Coarse / fine top-1 and the exact accuracy–GFLOPs curve over η (rank 0 gathers every shard)."""
    engine, facts = w.engine, w.setup
    engine.eval()
    cp, fp, ys, skipped = [], [], [], 0
    with torch.no_grad():
        for batch in _batches(w, "val", batch_size=256):
            valid = batch["valid"].bool()
            skipped += int((~valid).sum())
            if valid.any():
                out = engine.module(batch["image"][valid].to(engine.device, w.dtype), split_all=False)
                conf, pred = out.coarse_logits.float().softmax(-1).max(-1)
                cp.append(np.stack([conf.cpu().numpy(), pred.cpu().numpy()], 1))
                fp.append(out.fine_logits.argmax(-1).cpu().numpy())
                ys.append(batch["label"][valid].numpy())
    parts = _gather((cp, fp, ys, skipped))
    metrics["skipped_images"] += sum(p[3] for p in parts)
    if w.rank != 0 or not any(p[2] for p in parts):
        return None
    cat = lambda i: np.concatenate([a for p in parts for a in p[i]])  # noqa: E731
    (cprob, fprob), labels = _as_probs(cat(0), cat(1), len(facts.classes)), cat(2)
    g = facts.stage_gflops
    curve = eta_curve(cprob, fprob, labels, coarse_gflops=g["coarse"], fine_gflops=g["fine"])
    at_half = point_at(cprob, fprob, labels, 0.5, coarse_gflops=g["coarse"], fine_gflops=g["fine"])
    metrics.update({"val_images": len(labels), "val_coarse_top1": float((cprob.argmax(1) == labels).mean()),
                    "val_fine_top1": float((fprob.argmax(1) == labels).mean()),
                    "val_top1_eta_0.5": at_half.accuracy, "val_gflops_eta_0.5": at_half.gflops})
    return curve


def checkpoint(w: Worker, epoch: int, metrics: dict, curve) -> None:
    """Report the epoch; every `every_n_epochs` (and at the end) with a checkpoint: each rank's ZeRO shard,
    the resume state and (rank 0) the cfvit export that serving loads."""

    cfg = w.cfg
    last = epoch == cfg.schedule.epochs - 1
    if not (last or (epoch + 1) % cfg.checkpoint.every_n_epochs == 0):
        ray.train.report(metrics)
        return
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        w.engine.save_checkpoint(d, tag=DS_TAG)  # every rank writes its ZeRO shard; Ray merges the dirs
        if w.rank == 0:
            (Path(d) / STATE_FILE).write_text(json.dumps({"epoch": epoch, "epoch_seconds": w.history}))
            _export(w.engine.module, Path(d) / EXPORT_DIR, w.setup, cfg, curve, epoch)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))  # uploads, with retries
    took = time.perf_counter() - t0
    if took >= cfg.checkpoint.slow_write_s:  # say so: the epoch line would not (storage slow or away?)
        _say(f"[checkpoint] epoch {epoch + 1}: rank {w.rank} took {took:.1f} s to save and upload its "
             f"checkpoint to {cfg.checkpoint.storage_path}")


def epoch_line(cfg: JobConfig, m: dict) -> str:
    """One line per epoch, within 80 columns: training loss, validation coarse/fine top-1, training images/s,
    the share of the epoch spent waiting for Ray Data ("wait"), the ETA of the job (or its epoch's time)."""
    pct = lambda k: f"{100 * m[k]:.1f}%" if k in m else "n/a"  # noqa: E731
    last = m["epoch"] + 1 == cfg.schedule.epochs
    return (f"epoch {m['epoch'] + 1}/{cfg.schedule.epochs}  loss {m['train_loss']:.3f}  "
            f"coarse {pct('val_coarse_top1')}  fine {pct('val_fine_top1')}  {m['images_per_s']:.0f} img/s  "
            f"wait {100 * m['data_wait_share']:.0f}%  "
            + (f"took {_fmt_s(m['epoch_seconds'])}" if last else f"ETA {_fmt_s(m['eta_seconds'])}")
            + (f"  skipped {int(m['skipped_images'])}" if m["skipped_images"] else ""))


def _say(line: str) -> None:
    """One line on the worker's stdout, once (Ray Train's patched `print` would also log it a second time)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _progress(w: Worker, epoch: int, step: int, sums: EpochSums, t0: float, last: float) -> float:
    """Rank 0, every `log.progress_every_s`: a progress record of the running epoch (`cfvit pipeline` draws
    it as a bar). Local figures of rank 0; the epoch line has the all-reduced ones."""
    every, now = w.cfg.log.progress_every_s, time.perf_counter()
    if w.rank != 0 or not every or now - last < every:
        return last

    rec = {"epoch": epoch + 1, "epochs": w.cfg.schedule.epochs, "step": step, "loss": sums.loss / max(sums.images, 1),
           "images_per_s": sums.images * _world() / max(now - t0, 1e-9), "split_all": bool(w.engine.module.split_all)}
    _say(PROGRESS_TAG + json.dumps(rec))
    return now


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _gather(obj):
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _kill_drill(cfg: JobConfig, epoch: int, rank: int) -> None:
    """Failure drill (tests): SIGKILL this worker once, after Ray has registered the last checkpoint
    (reports are registered asynchronously; waiting makes the drill's outcome deterministic)."""

    d = cfg.debug
    if d.kill_at_epoch != epoch or d.kill_rank != rank or not d.kill_marker or os.path.exists(d.kill_marker):
        return
    ray.train.get_all_reported_checkpoints(timeout_s=120)
    Path(d.kill_marker).write_text(f"rank {rank} killed at epoch {epoch}\n")
    os.kill(os.getpid(), signal.SIGKILL)


def _as_probs(coarse_conf_pred, fine_pred, num_classes: int):
    """N x C arrays with the same max and argmax as the real probabilities: all `eta_curve` reads. Workers
    send (confidence, prediction) pairs instead of N x C matrices (50k x 1000 floats per epoch on ImageNet)."""

    n, rows = len(fine_pred), np.arange(len(fine_pred))
    cp = np.zeros((n, num_classes), np.float32)
    cp[rows, coarse_conf_pred[:, 1].astype(np.int64)] = coarse_conf_pred[:, 0]
    fp = np.zeros((n, num_classes), np.float32)
    fp[rows, fine_pred.astype(np.int64)] = 1.0
    return cp, fp


def _log_epoch(facts: WorkerSetup, metrics, curve, epoch, title) -> None:
    try:
        tracking.log_metrics(facts.tracking_uri, facts.mlflow_run_id, metrics, step=epoch)
        if curve is not None:
            tracking.log_curve(facts.tracking_uri, facts.mlflow_run_id, curve, facts.backbone_gflops, title)
    except Exception as e:  # a tracking outage must not cost the training run
        print(f"[warning] MLflow logging failed at epoch {epoch + 1}: {e}", flush=True)


def _export(module, path: Path, facts: WorkerSetup, cfg: JobConfig, curve, epoch: int) -> None:



    # export fp32 weights whatever the training precision
    model = module if next(module.parameters()).dtype == torch.float32 else copy.deepcopy(module).float()
    g = facts.stage_gflops
    budgets = cfg.schedule.budgets or [g["coarse"] + f * g["fine"] for f in (0.25, 0.5, 0.75, 1.0)]
    table = eta_table(curve, budgets) if curve is not None else []
    was = model.split_all
    model.split_all = False  # exported for inference: informative selection
    # `data.val`: what `cfvit calibrate` re-calibrates on when no --data is given
    cfvit.save(model, path, class_names=facts.classes, eta_table=table, trained_epochs=epoch + 1,
               job=cfg.name, data={"val": cfg.data.val},
               agreement_profile=agreement_profile(curve) if curve is not None else [])
    model.split_all = was


def _fmt_s(sec: float) -> str:
    sec = int(round(sec))
    return f"{sec // 3600}h{sec % 3600 // 60:02d}m" if sec >= 3600 else f"{sec // 60}m{sec % 60:02d}s"
