"""Resume from DeepSpeed checkpoints without unpickling arbitrary objects.

DeepSpeed's torch checkpoint engine loads with `weights_only=False`, so a checkpoint planted in the
storage a job resumes from (a shared bucket) could run code on every worker. Its optimizer state holds
only tensors, containers and a few plain DeepSpeed value types, so it loads with `weights_only=True` and
those types allow-listed; anything else is refused by torch.
"""
from __future__ import annotations

import importlib

import torch
from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

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


class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch engine, except that `load` is `torch.load(weights_only=True)`."""

    def load(self, path: str, map_location=None):
        with torch.serialization.safe_globals([_resolve(n) for n in SAFE_GLOBALS]):
            return torch.load(path, map_location=map_location, weights_only=True)


def use_weights_only_loading(engine) -> None:
    """Swap the engine's checkpoint engine class in place (saving is unchanged)."""
    ce = getattr(engine, "checkpoint_engine", None)
    if type(ce) is not TorchCheckpointEngine:
        raise TypeError(f"expected DeepSpeed's TorchCheckpointEngine, got {type(ce).__name__}: "
                        "cannot make its resume path weights-only")
    ce.__class__ = WeightsOnlyCheckpointEngine
