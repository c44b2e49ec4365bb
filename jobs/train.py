"""CF-ViT training job: Ray Train `TorchTrainer` + DeepSpeed, data streamed by Ray Data, MLflow tracking.

    python -m jobs.train --config jobs/configs/fmnist_tiny.yaml --set schedule.epochs=3

`run_training(cfg)` is the driver (also used by the tuning job); `train_loop_per_worker(config)` runs on
every worker and reports per-epoch metrics with `ray.train.report`, so it works under Ray Tune as well.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from .config import ConfigError, JobConfig, load_config

DS_TAG = "deepspeed"  # DeepSpeed state inside a Ray checkpoint (for resuming)
EXPORT_DIR = "model"  # cfvit.save export inside a Ray checkpoint (for serving)
STATE_FILE = "train_state.json"
ENV_PREFIXES = ("AWS_", "MLFLOW_", "FASHION_MNIST_ROOT")


# ---------------------------------------------------------------------------------------------- worker
def deepspeed_config(cfg: JobConfig, on_gpu: bool) -> dict:
    ds = cfg.deepspeed
    precision = ds.precision if ds.precision != "auto" else ("bf16" if on_gpu else "fp32")
    conf = {
        "train_micro_batch_size_per_gpu": ds.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": ds.gradient_clipping,
        "zero_optimization": {"stage": ds.zero_stage},
        "zero_allow_untested_optimizer": True,  # timm's optimizers are plain torch optimizers
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }
    return {**conf, **ds.extra}


def _gather(obj):
    import torch.distributed as dist

    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _sum(values: list[float]) -> list[float]:
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def _kill_drill(cfg: JobConfig, epoch: int, rank: int) -> None:
    """Failure drill (tests): SIGKILL this worker once, after Ray has registered the last checkpoint
    (reports are registered asynchronously; waiting makes the drill's outcome deterministic)."""
    import ray.train

    d = cfg.debug
    if d.kill_at_epoch != epoch or d.kill_rank != rank or not d.kill_marker or os.path.exists(d.kill_marker):
        return
    ray.train.get_all_reported_checkpoints(timeout_s=120)
    Path(d.kill_marker).write_text(f"rank {rank} killed at epoch {epoch}\n")
    os.kill(os.getpid(), signal.SIGKILL)


def train_loop_per_worker(config: dict) -> None:
    import warnings

    # DeepSpeed's ZeRO calls a torch.distributed API that warns on every step: keep the epoch lines readable.
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*", category=FutureWarning)
    import deepspeed
    import numpy as np
    import ray.train
    import torch
    from rich.console import Console
    from timm.data import Mixup
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    import cfvit
    from cfvit.budget import eta_curve
    from cfvit.losses import cfvit_loss

    from .ds_checkpoint import use_weights_only_loading

    cfg = JobConfig.model_validate(config["job"])
    meta = config["meta"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.seed + rank)
    on_gpu = cfg.scaling.use_gpu and torch.cuda.is_available()
    console = Console(force_terminal=False, width=160)

    model = cfvit.create_model(cfg.model.name, **cfg.model.create_kwargs(len(meta["classes"])))
    optimizer = create_optimizer_v2(model, opt=cfg.optim.opt, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
                                    **({"momentum": cfg.optim.momentum} if "sgd" in cfg.optim.opt else {}))
    s = cfg.schedule
    # timm schedulers are pure functions of the epoch: resuming only needs the epoch number
    scheduler, _ = create_scheduler_v2(optimizer, sched=s.sched, num_epochs=s.epochs, warmup_epochs=s.warmup_epochs,
                                       warmup_lr=s.warmup_lr, min_lr=s.min_lr)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                           config=deepspeed_config(cfg, on_gpu), dist_init_required=False)
    use_weights_only_loading(engine)  # resuming never unpickles arbitrary objects from the storage
    dtype = torch.bfloat16 if engine.bfloat16_enabled() else (torch.float16 if engine.fp16_enabled() else torch.float32)
    a = cfg.augment
    mixup = Mixup(mixup_alpha=a.mixup, cutmix_alpha=a.cutmix, prob=a.mixup_prob, switch_prob=a.mixup_switch_prob,
                  label_smoothing=a.label_smoothing, num_classes=len(meta["classes"])) if (a.mixup or a.cutmix) else None

    start_epoch, history = 0, []
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            engine.load_checkpoint(d, tag=DS_TAG)  # weights_only: see jobs/ds_checkpoint.py
            state = json.loads((Path(d) / STATE_FILE).read_text())
        start_epoch, history = state["epoch"] + 1, state.get("epoch_seconds", [])
        if rank == 0:
            console.print(f"[resume] from the checkpoint of epoch {state['epoch']}: continuing at epoch {start_epoch}")

    gflops = meta["stage_gflops"]
    for epoch in range(start_epoch, s.epochs):
        _kill_drill(cfg, epoch, rank)
        split_all = epoch < cfg.split_epochs
        engine.module.split_all = split_all
        scheduler.step(epoch)
        engine.train()
        t0 = time.perf_counter()
        sums = np.zeros(5)  # loss*n, ce*n, aux*n, images, skipped
        shard = ray.train.get_dataset_shard("train")
        # Files are shuffled per epoch by the reader; the buffer also mixes images within files/blocks
        # (the built-in set is one block). Seeded per epoch and rank: reproducible, different each epoch.
        buffer = cfg.data.shuffle_buffer or None
        batches = shard.iter_torch_batches(batch_size=cfg.deepspeed.micro_batch_size, drop_last=True,
                                           local_shuffle_buffer_size=buffer,
                                           local_shuffle_seed=(cfg.seed + 1000 * epoch + rank) if buffer else None)
        for step, batch in enumerate(batches):
            if cfg.debug.max_steps_per_epoch and step >= cfg.debug.max_steps_per_epoch:
                break
            valid = batch["valid"].bool()
            x, y = batch["image"][valid], batch["label"][valid]
            sums[4] += int((~valid).sum())
            if mixup is not None:  # timm's Mixup wants an even batch
                x, y = x[: len(x) // 2 * 2], y[: len(y) // 2 * 2]
            weight = 1.0
            if len(x) == 0:  # every image in this micro-batch was corrupt: step anyway, ranks must stay in step
                x, y, weight = batch["image"][:2], batch["label"][:2], 0.0
            if mixup is not None:
                x, y = mixup(x, y)
            out = engine(x.to(engine.device, dtype))
            loss, parts = cfvit_loss(out.coarse_logits.float(), out.fine_logits.float(), y.to(engine.device),
                                     coarse_loss=cfg.model.coarse_loss,
                                     smoothing=0.0 if mixup is not None else a.label_smoothing)
            engine.backward(loss * weight)
            engine.step()
            n = len(x) * weight
            sums += [float(loss.detach()) * n, parts["ce"] * n, parts[cfg.model.coarse_loss] * n, n, 0]
        train_s = time.perf_counter() - t0
        loss_sum, ce_sum, aux_sum, images, skipped = _sum(list(sums))

        # validation: coarse / fine top-1 and the exact accuracy–GFLOPs curve over η
        engine.eval()
        cp, fp, ys, val_skipped = [], [], [], 0
        with torch.no_grad():
            for batch in ray.train.get_dataset_shard("val").iter_torch_batches(batch_size=256):
                valid = batch["valid"].bool()
                val_skipped += int((~valid).sum())
                if valid.any():
                    out = engine.module(batch["image"][valid].to(engine.device, dtype), split_all=False)
                    conf, pred = out.coarse_logits.float().softmax(-1).max(-1)
                    cp.append(np.stack([conf.cpu().numpy(), pred.cpu().numpy()], 1))
                    fp.append(out.fine_logits.argmax(-1).cpu().numpy())
                    ys.append(batch["label"][valid].numpy())
        parts_all = _gather((cp, fp, ys, val_skipped))
        epoch_s = time.perf_counter() - t0
        history.append(epoch_s)
        metrics: dict[str, Any] = {
            "epoch": epoch, "train_loss": loss_sum / max(images, 1), "train_ce": ce_sum / max(images, 1),
            f"train_{cfg.model.coarse_loss}": aux_sum / max(images, 1), "train_images": images,
            "images_per_s": images / train_s if train_s else 0.0, "lr": optimizer.param_groups[0]["lr"],
            "split_all": int(split_all), "skipped_images": skipped + sum(p[3] for p in parts_all),
            "train_skipped_images": skipped, "epoch_seconds": epoch_s,
            "start_epoch": start_epoch,  # where this worker group (re)started: shows resumes
        }
        curve = None
        if rank == 0 and any(p[2] for p in parts_all):
            cat = lambda i: np.concatenate([a for p in parts_all for a in p[i]])  # noqa: E731
            (cprob, fprob), labels = _as_probs(cat(0), cat(1), len(meta["classes"])), cat(2)
            curve = eta_curve(cprob, fprob, labels, coarse_gflops=gflops["coarse"], fine_gflops=gflops["fine"])
            metrics.update({
                "val_images": len(labels),
                "val_coarse_top1": float((cprob.argmax(1) == labels).mean()),
                "val_fine_top1": float((fprob.argmax(1) == labels).mean()),
            })
            exits = cprob.max(1) >= 0.5  # the inference rule at η = 0.5, exactly
            pred = np.where(exits, cprob.argmax(1), fprob.argmax(1))
            metrics["val_top1_eta_0.5"] = float((pred == labels).mean())
            metrics["val_gflops_eta_0.5"] = float(gflops["coarse"] + (1 - exits.mean()) * gflops["fine"])
        remaining = (s.epochs - epoch - 1) * (sum(history[-3:]) / len(history[-3:]))
        metrics["eta_seconds"] = remaining
        if rank == 0:
            console.print(
                f"epoch {epoch + 1:>3}/{s.epochs}  loss {metrics['train_loss']:.4f}  "
                f"coarse {100 * metrics.get('val_coarse_top1', float('nan')):5.1f}%  "
                f"fine {100 * metrics.get('val_fine_top1', float('nan')):5.1f}%  "
                f"{metrics['images_per_s']:7.1f} img/s  lr {metrics['lr']:.2e}  "
                f"{'split-all' if split_all else 'selection'}  skipped {int(metrics['skipped_images'])}  "
                f"{epoch_s:5.1f}s  ETA {_fmt_s(remaining)}", highlight=False)
            if meta.get("mlflow_run_id"):
                _log_epoch(meta, metrics, curve, epoch, f"{cfg.name} epoch {epoch + 1}", console)

        last = epoch == s.epochs - 1
        if last or (epoch + 1) % cfg.checkpoint.every_n_epochs == 0:
            with tempfile.TemporaryDirectory() as d:
                engine.save_checkpoint(d, tag=DS_TAG)  # every rank writes its ZeRO shard; Ray merges the dirs
                if rank == 0:
                    (Path(d) / STATE_FILE).write_text(json.dumps({"epoch": epoch, "epoch_seconds": history}))
                    _export(engine.module, Path(d) / EXPORT_DIR, meta, cfg, curve, epoch)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        else:
            ray.train.report(metrics)


def _as_probs(coarse_conf_pred, fine_pred, num_classes: int):
    """N x C arrays with the same max and argmax as the real probabilities: all `eta_curve` reads. Workers
    send (confidence, prediction) pairs instead of N x C matrices (50k x 1000 floats per epoch on ImageNet)."""
    import numpy as np

    n, rows = len(fine_pred), np.arange(len(fine_pred))
    cp = np.zeros((n, num_classes), np.float32)
    cp[rows, coarse_conf_pred[:, 1].astype(np.int64)] = coarse_conf_pred[:, 0]
    fp = np.zeros((n, num_classes), np.float32)
    fp[rows, fine_pred.astype(np.int64)] = 1.0
    return cp, fp


def _log_epoch(meta, metrics, curve, epoch, title, console) -> None:
    from . import tracking

    try:
        tracking.log_metrics(meta["tracking_uri"], meta["mlflow_run_id"], metrics, step=epoch)
        if curve is not None:
            tracking.log_curve(meta["tracking_uri"], meta["mlflow_run_id"], curve, meta["backbone_gflops"], title)
    except Exception as e:  # a tracking outage must not cost the training run
        console.print(f"[warning] MLflow logging failed at epoch {epoch + 1}: {e}", highlight=False)


def _export(module, path: Path, meta: dict, cfg: JobConfig, curve, epoch: int) -> None:
    import copy

    import cfvit
    from cfvit.budget import eta_table

    import torch

    # export fp32 weights whatever the training precision
    model = module if next(module.parameters()).dtype == torch.float32 else copy.deepcopy(module).float()
    g = meta["stage_gflops"]
    budgets = cfg.schedule.budgets or [g["coarse"] + f * g["fine"] for f in (0.25, 0.5, 0.75, 1.0)]
    table = eta_table(curve, budgets) if curve is not None else []
    was = model.split_all
    model.split_all = False  # exported for inference: informative selection
    # `data.val`: what `cfvit calibrate` re-calibrates on when no --data is given
    cfvit.save(model, path, class_names=meta["classes"], eta_table=table, trained_epochs=epoch + 1,
               job=cfg.name, data={"val": cfg.data.val})
    model.split_all = was


def _fmt_s(sec: float) -> str:
    sec = int(round(sec))
    return f"{sec // 3600}h{sec % 3600 // 60:02d}m" if sec >= 3600 else f"{sec // 60}m{sec % 60:02d}s"


# ---------------------------------------------------------------------------------------------- driver
@dataclass
class TrainingOutcome:
    result: Any  # ray.train.Result
    metrics: dict
    checkpoint_path: Optional[str]
    mlflow_run_id: Optional[str]
    model_version: Optional[int]


def prepare(cfg: JobConfig) -> dict:
    """Everything the workers need that the driver can work out once: classes, model facts."""
    import cfvit

    from .data import describe

    try:
        train_src = describe(cfg.data.train, cfg.data.format)
        val_src = describe(cfg.data.val, cfg.data.format)
    except (OSError, ValueError) as e:
        raise ConfigError(f"data: {e}") from None
    if val_src.classes != train_src.classes:
        raise ConfigError(f"data.val has classes {val_src.classes[:5]}… but data.train has {train_src.classes[:5]}…")
    try:
        model = cfvit.create_model(cfg.model.name, **cfg.model.create_kwargs(len(train_src.classes)))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model: cannot build {cfg.model.name!r} with {cfg.model.create_kwargs(len(train_src.classes))}: {e}") from None
    return {"train_src": train_src, "val_src": val_src, "classes": train_src.classes,
            "data_config": model.data_config, "stage_gflops": model.stage_gflops(),
            "backbone_gflops": model.backbone_gflops()}


def init_ray(cfg: JobConfig, need_cpus: Optional[float] = None) -> None:
    """Join `scaling.ray_address` / RAY_ADDRESS, else start a local Ray with at least `need_cpus` logical CPUs
    (default: the train workers plus room for Ray Data's readers)."""
    import ray

    if ray.is_initialized():
        return
    address = cfg.scaling.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        if need_cpus is None:
            need_cpus = cfg.scaling.num_workers * cfg.scaling.cpus_per_worker + 2
        ray.init(num_cpus=max(os.cpu_count() or 1, int(math.ceil(need_cpus))), include_dashboard=False)


def run_training(cfg: JobConfig, *, callbacks: Optional[list] = None, parent_run_id: Optional[str] = None,
                 register: bool = True) -> TrainingOutcome:
    """Validate, start (or join) Ray, train with checkpoints and MLflow; register the final model."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from . import tracking
    from .data import build_datasets, storage

    prep = prepare(cfg)
    run_id, uri = None, tracking.tracking_uri(cfg.mlflow.tracking_uri)
    if cfg.mlflow.enabled:
        run_id = tracking.start_run(uri, cfg.mlflow.experiment, cfg.run_name, cfg.flat(), parent_run_id=parent_run_id,
                                    tags={"cfvit.job": cfg.name, "cfvit.model": cfg.model.name})
    # Whatever fails after the run starts (Ray, data, training, registration) closes it as FAILED.
    try:
        init_ray(cfg)
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False  # the epoch lines are the progress
        meta = {k: prep[k] for k in ("classes", "data_config", "stage_gflops", "backbone_gflops")}
        meta.update(mlflow_run_id=run_id, tracking_uri=uri)
        env = {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIXES)}
        if run_id:
            env["MLFLOW_TRACKING_URI"] = uri
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"job": cfg.model_dump(mode="json"), "meta": meta},
            torch_config=TorchConfig(backend="nccl" if cfg.scaling.use_gpu else "gloo"),
            scaling_config=ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                         resources_per_worker={"CPU": cfg.scaling.cpus_per_worker}),
            run_config=RunConfig(
                name=cfg.run_name, **storage(cfg.checkpoint.storage_path),
                failure_config=FailureConfig(max_failures=cfg.checkpoint.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.num_to_keep),
                callbacks=callbacks, worker_runtime_env={"env_vars": env}),
            datasets=build_datasets(cfg, prep["data_config"], prep["train_src"], prep["val_src"]),
        )
        result = trainer.fit()
        version = None
        if run_id and result.checkpoint is not None:
            with result.checkpoint.as_directory() as d:
                version = tracking.log_model(uri, run_id, Path(d) / EXPORT_DIR,
                                             cfg.mlflow.registered_model if register else None, cfg.mlflow.alias)
    except BaseException:
        if run_id:
            tracking.end_run(uri, run_id, "FAILED")
        raise
    if run_id:
        tracking.end_run(uri, run_id)
    return TrainingOutcome(result=result, metrics=dict(result.metrics or {}),
                           checkpoint_path=result.checkpoint.path if result.checkpoint else None,
                           mlflow_run_id=run_id, model_version=version)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.train", description=__doc__.splitlines()[0])
    p.add_argument("--config", default=None, help="YAML file or shipped config name (default: fmnist_tiny)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY.SUB=VALUE",
                   help="override a config value (YAML typed); repeatable")
    args = p.parse_args(argv)
    try:
        out = run_training(load_config(args.config, args.sets))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = {k: out.metrics.get(k) for k in ("epoch", "val_coarse_top1", "val_fine_top1", "images_per_s")}
    print(json.dumps({"checkpoint": out.checkpoint_path, "mlflow_run_id": out.mlflow_run_id,
                      "model_version": out.model_version, **summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
