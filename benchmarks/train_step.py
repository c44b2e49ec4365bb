"""Training-step benchmark: CF-ViT (both schedule phases) vs its backbone alone, same settings.

Plain PyTorch steps (forward, loss, backward, AdamW) on random images; optionally the same through
DeepSpeed at several ZeRO stages in one process, with peak GPU memory."""
from __future__ import annotations

import os
import time
from typing import Optional

import deepspeed
import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.optim import create_optimizer_v2

import cfvit
from cfvit.losses import step_loss
from jobs.train.deepspeed import deepspeed_config


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time_steps(step, steps: int, device, warmup: int = 3) -> float:
    for _ in range(warmup):
        step()
    _sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return (time.perf_counter() - t) / steps


def _make_step(module, kind: str, x, y, opt_or_engine, bf16: bool, engine=False):
    def forward_loss():
        # the training job's step (cfvit.losses.step_loss); bf16 by autocast here, by the engine under DeepSpeed
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16 and not engine):
            xin = x.to(torch.bfloat16) if (engine and bf16) else x
            if kind == "backbone":  # `module` is the plain ViT itself here
                return F.cross_entropy(module(xin).float(), y)
            return step_loss(module, xin, y, split_all=kind == "cfvit_split_all").loss

    if engine:
        def step():
            loss = forward_loss()
            opt_or_engine.backward(loss)
            opt_or_engine.step()
    else:
        def step():
            loss = forward_loss()
            opt_or_engine.zero_grad(set_to_none=True)
            loss.backward()
            opt_or_engine.step()
    return step


def _init_single_process_dist(device) -> None:
    if dist.is_initialized():
        return
    for k, v in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29512", "RANK": "0", "WORLD_SIZE": "1",
                 "LOCAL_RANK": "0"}.items():
        os.environ.setdefault(k, v)
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")


# ~60 lines: the plain and the DeepSpeed measurements side by side, so both use the same inputs.
def bench_train(model_name: str = "cfvit_tiny_fmnist", overrides: Optional[dict] = None, *, batch_size: int = 64,
                steps: int = 10, device: Optional[str] = None, bf16: Optional[bool] = None,
                zero_stages: tuple = ()) -> dict:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    bf16 = (dev.type == "cuda") if bf16 is None else bf16
    torch.manual_seed(0)
    probe = cfvit.create_model(model_name, **(overrides or {}))
    x = torch.randn(batch_size, *probe.data_config["input_size"], device=dev)
    y = torch.randint(0, probe.num_classes, (batch_size,), device=dev)
    rows = []
    variants = ("backbone", "cfvit_split_all", "cfvit_selection")

    def fresh(kind):
        torch.manual_seed(0)
        m = cfvit.create_model(model_name, **(overrides or {}))
        return (m.vit if kind == "backbone" else m).to(dev).train()

    for kind in variants:
        m = fresh(kind)
        opt = create_optimizer_v2(m, opt="adamw", lr=1e-4, weight_decay=0.05)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        sec = _time_steps(_make_step(m, kind, x, y, opt, bf16), steps, dev)
        peak = torch.cuda.max_memory_allocated() / 2 ** 20 if dev.type == "cuda" else None
        rows.append({"variant": kind, "zero": None, "step_ms": 1e3 * sec, "images_per_s": batch_size / sec,
                     "peak_mib": peak})
        del m, opt

    if zero_stages:
        if dev.type != "cuda":  # single-process DeepSpeed on CPU waits for shared-memory peers
            raise ValueError("the ZeRO rows need a CUDA device; on CPU the e2e training test covers DeepSpeed")


        _init_single_process_dist(dev)
        for stage in zero_stages:
            for kind in variants:
                m = fresh(kind)
                opt = create_optimizer_v2(m, opt="adamw", lr=1e-4, weight_decay=0.05)
                conf = deepspeed_config(None, True, micro_batch_size=batch_size, zero_stage=stage,
                                        precision="bf16" if bf16 else "fp32")
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                engine, *_ = deepspeed.initialize(model=m, optimizer=opt, config=conf)
                sec = _time_steps(_make_step(engine, kind, x, y, engine, bf16, engine=True), steps, dev)
                peak = torch.cuda.max_memory_allocated() / 2 ** 20 if dev.type == "cuda" else None
                rows.append({"variant": f"{kind} ZeRO-{stage}", "zero": stage, "step_ms": 1e3 * sec,
                             "images_per_s": batch_size / sec, "peak_mib": peak})
                del engine, m, opt

    for r in rows:  # ratio to the backbone with the same ZeRO setting
        base = next(b for b in rows if b["variant"].startswith("backbone") and b["zero"] == r["zero"])
        r["ratio"] = r["step_ms"] / base["step_ms"]
    plain = {r["variant"]: r for r in rows if r["zero"] is None}
    return {"model": model_name, "overrides": overrides or {}, "device": str(dev) if dev.type == "cpu"
            else torch.cuda.get_device_name(dev), "bf16": bf16, "batch_size": batch_size, "steps": steps,
            "rows": rows, "cfvit_ratio": plain["cfvit_selection"]["ratio"],
            "split_all_ratio": plain["cfvit_split_all"]["ratio"]}
