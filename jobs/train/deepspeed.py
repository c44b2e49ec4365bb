"""DeepSpeed for the training job: the one config builder, and resume without unpickling arbitrary objects.

DeepSpeed's torch checkpoint engine loads with `weights_only=False`, so a checkpoint planted in the
storage a job resumes from (a shared bucket) could run code on every worker. Its optimizer state holds
only tensors, containers and a few plain DeepSpeed value types, so it loads with `weights_only=True` and
those types allow-listed; anything else is refused by torch.
"""
from __future__ import annotations

import importlib
from typing import Optional

import torch
from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine


def deepspeed_config(cfg, on_gpu: bool, *, micro_batch_size: Optional[int] = None, grad_accum: Optional[int] = None,
                     zero_stage: Optional[int] = None, precision: Optional[str] = None) -> dict:
    """The DeepSpeed config of a `JobConfig` (its `deepspeed:` section); the keyword arguments override it
    (`cfvit bench train`, benchmarks/deepspeed_step.py). `cfg=None` builds from the keywords alone."""
    ds = cfg.deepspeed if cfg is not None else None
    precision = precision or (ds.precision if ds else "auto")
    if precision == "auto":
        precision = "bf16" if on_gpu else "fp32"
    conf = {
        "train_micro_batch_size_per_gpu": micro_batch_size or ds.micro_batch_size,
        "gradient_accumulation_steps": grad_accum or (cfg.grad_accum if cfg is not None else 1),
        "gradient_clipping": ds.gradient_clipping if ds else 0.0,
        "zero_optimization": {"stage": ds.zero_stage if zero_stage is None else zero_stage},
        "zero_allow_untested_optimizer": True,  # timm's optimizers are plain torch optimizers
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }
    return {**conf, **(ds.extra if ds else {})}

# What ZeRO 0-3 checkpoints hold besides tensors and containers: LossScaler, ZeroStageEnum and
# fragment_address found by loading fp32 and bf16 checkpoints of each stage; DynamicLossScaler is fp16's.
SAFE_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


def _resolve(name: str):
    module, _, attr = name.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def _weights_only_engine_class():
    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        """DeepSpeed's torch engine, except that `load` is `torch.load(weights_only=True)`."""

        def load(self, path: str, map_location=None):
            with torch.serialization.safe_globals([_resolve(n) for n in SAFE_GLOBALS]):
                return torch.load(path, map_location=map_location, weights_only=True)

    return TorchCheckpointEngine, WeightsOnlyCheckpointEngine


def use_weights_only_loading(engine) -> None:
    """Swap the engine's checkpoint engine class in place (saving is unchanged)."""
    TorchCheckpointEngine, WeightsOnlyCheckpointEngine = _weights_only_engine_class()
    ce = getattr(engine, "checkpoint_engine", None)
    if type(ce) is not TorchCheckpointEngine:
        raise TypeError(f"expected DeepSpeed's TorchCheckpointEngine, got {type(ce).__name__}: "
                        "cannot make its resume path weights-only")
    ce.__class__ = WeightsOnlyCheckpointEngine
